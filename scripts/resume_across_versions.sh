#!/usr/bin/env bash
# A run started by an older transferkit, SIGKILLed at a mid-epoch checkpoint, resumed by this checkout,
# against one straight run of the older version: weights and metrics must be bit-identical.
#   git worktree add /tmp/old <commit>; bash scripts/resume_across_versions.sh /tmp/old/src [WORKDIR]
set -u
OLD_SRC=$(realpath "$1")
HERE=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$HERE/../shared}
WORK=${2:-$(mktemp -d)}
mkdir -p "$WORK" && cd "$WORK"
rm -rf data runs; mkdir -p data runs
for split in train test; do for c in airplane cat ship; do mkdir -p data/$split/$c
  ls $SHARED/data/cifar10/$split/$c | head -$([ $split = train ] && echo 40 || echo 10) | while read f; do ln -s $SHARED/data/cifar10/$split/$c/$f data/$split/$c/$f; done
done; done
PY=$HERE/.venv/bin/python
ARGS="--data data --model mobilenet_v2 --weights IMAGENET1K_V1 --image-size 32 --epochs 3 --batch-size 8 --strategy gradual --head-epochs 1 --workers 1 --checkpoint-every 3 --val-split 0.25"
PYTHONPATH=$OLD_SRC $PY -m transferkit train $ARGS --out runs/straight > straight.log 2>&1
PYTHONPATH=$OLD_SRC $PY -m transferkit train $ARGS --out runs/killed > killed.log 2>&1 &
pid=$!
# kill at a mid-epoch checkpoint of epoch 2
$PY - <<'WAIT'
import time, torch
while True:
    try:
        d = torch.load("runs/killed/last.pt", weights_only=True)
        if d["epoch"] == 2 and d["step"] is not None:
            break
    except Exception:
        pass
    time.sleep(0.05)
WAIT
kill -9 $pid; wait $pid 2>/dev/null
echo "killed; last.pt: $(ls -la runs/killed/last.pt)"
$PY -c "import torch; d=torch.load('runs/killed/last.pt', weights_only=True); print('killed at epoch', d['epoch'], 'step', d['step'])"
PYTHONPATH=$HERE/src $PY -m transferkit train --resume runs/killed > resumed.log 2>&1; echo "resume rc $?"
$PY - <<'PY'
import json, torch
from safetensors.torch import load_file
a, b = load_file("runs/straight/model.safetensors"), load_file("runs/killed/model.safetensors")
print("weights bit-identical:", a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))
ra = [json.loads(l) for l in open("runs/straight/metrics.jsonl")]
rb = [json.loads(l) for l in open("runs/killed/metrics.jsonl")]
keys = ["epoch", "train_loss", "train_acc", "val_acc", "val_loss"]
print("metrics identical:", [{k: r[k] for k in keys} for r in ra] == [{k: r[k] for k in keys} for r in rb])
print("test accuracy:", json.load(open("runs/straight/report.json"))["accuracy"], json.load(open("runs/killed/report.json"))["accuracy"])
PY
