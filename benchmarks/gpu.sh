#!/usr/bin/env bash
# The GPU figures in one go, for a lent GPU machine (budget: ~15 minutes all included, no network but the
# package registries, maybe not even those):
#   1. the machine (nvidia-smi, torch, CPU)            -> $OUT/machine.txt
#   2. install the project (scripts/setup.sh)          -> $OUT/setup.log   (on failure: why, then carry on with
#                                                                           whatever Python has torch)
#   3. the CUDA-marked tests (pytest -m cuda)          -> $OUT/cuda_tests.log
#   4. training throughput, classic loop vs transferkit -> $OUT/throughput.log
#   5. CIFAR-10 --recipe fast, wall time all included  -> $OUT/fast.log, $OUT/fast/ (the run folder)
# Every step runs under `timeout` and its exit status and seconds go to $OUT/summary.tsv; the figures to
# $OUT/summary.json. A step that fails does not stop the next.
#
#   bash benchmarks/gpu.sh                # on the GPU machine; OUT defaults to ./gpu-results
#   bash benchmarks/gpu.sh --dry-run      # (or DRY_RUN=1) the same steps on the CPU, tiny, in about a minute:
#                                         # no install (PYTHON: the current one), CIFAR=DIR for a small folder
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=${DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$ROOT/gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/summary.tsv"
log() { echo "gpu.sh: $*" | tee -a "$OUT/summary.txt" >&2; }

# step NAME SECONDS CMD...: run CMD under timeout, its output in $OUT/NAME.log, one line in summary.tsv.
step() {
  local name=$1 limit=$2
  shift 2
  local start end rc
  start=$(date +%s.%N)
  timeout --signal=TERM --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  local secs
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\n' "$name" "$rc" "$secs" >> "$OUT/summary.tsv"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    log "$name: stopped by its ${limit} s timeout after ${secs} s (last lines: $(tail -n 3 "$OUT/$name.log" | tr '\n' ' '))"
  elif [ "$rc" != 0 ]; then
    log "$name: failed, exit $rc after ${secs} s (last lines: $(tail -n 3 "$OUT/$name.log" | tr '\n' ' '))"
  else
    log "$name: ok in ${secs} s"
  fi
  return 0
}

# Where the CIFAR-10 image folder is: $CIFAR, else the shared folder beside or inside the checkout.
CIFAR=${CIFAR:-}
for c in "$ROOT/shared/data/cifar10" "$ROOT/../shared/data/cifar10"; do
  [ -z "$CIFAR" ] && [ -d "$c/train" ] && CIFAR=$(cd "$c" && pwd)
done

if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-python3}
  export CUDA_VISIBLE_DEVICES=""  # the dry run is the CPU path, even on a machine with a GPU
  DEVICE=cpu
  TESTS=(tests/test_cuda.py)
  THROUGHPUT=(--steps 2 --size 32 --batch-size 16 --models resnet18)
  FAST=(--max-train-images 60 --epochs 1 --image-size 32 --micro-batch 0 --val-split 0.2)
  T_SETUP=60 T_TESTS=120 T_THROUGHPUT=120 T_FAST=180
  log "dry run on the CPU (tiny settings), results in $OUT"
else
  PY=$ROOT/.venv/bin/python
  DEVICE=cuda
  TESTS=(tests)
  THROUGHPUT=(--steps 20 --size 224 --batch-size 256 --models resnet18 mobilenet_v2)
  FAST=()
  T_SETUP=300 T_TESTS=150 T_THROUGHPUT=150 T_FAST=420
fi

{
  date -u
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  grep -m1 "model name" /proc/cpuinfo
  echo "cores: $(nproc); avx512_bf16: $(grep -qw avx512_bf16 /proc/cpuinfo && echo yes || echo no)"
  git -C "$ROOT" log -1 --format='commit %H %s' 2>/dev/null
} > "$OUT/machine.txt" 2>&1

if [ "$DRY" = 1 ]; then
  step setup "$T_SETUP" "$PY" -c "import torch, transferkit; print('torch', torch.__version__)"
else
  step setup "$T_SETUP" bash scripts/setup.sh
  if ! "$PY" -c "import torch, transferkit" 2>/dev/null; then
    # setup.sh could not install (no registry, no wheel cache): use a Python that already has torch.
    for alt in python3 python; do
      if command -v "$alt" >/dev/null && "$alt" -c "import torch" 2>/dev/null; then
        PY=$(command -v "$alt")
        export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
        log "setup did not give a working .venv; using $PY with PYTHONPATH=src"
        break
      fi
    done
  fi
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available',
torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" \
  >> "$OUT/machine.txt" 2>&1 || log "no Python with torch: the steps below will fail"

step cuda_tests "$T_TESTS" "$PY" -m pytest -q -m cuda -p no:cacheprovider "${TESTS[@]}"

if [ -n "$CIFAR" ]; then
  step throughput "$T_THROUGHPUT" "$PY" benchmarks/throughput.py --data "$CIFAR" --device "$DEVICE" "${THROUGHPUT[@]}"
  step fast "$T_FAST" "$PY" -m transferkit train --recipe fast --data "$CIFAR" --device "$DEVICE" \
    --out "$OUT/fast" --overwrite "${FAST[@]}"
else
  log "no CIFAR-10 image folder (set CIFAR=DIR, or put it at shared/data/cifar10): throughput and fast skipped"
fi

# The figures in one JSON file: each step's status and seconds, the throughput lines, the fast run's accuracy.
"${PYTHON:-$PY}" - "$OUT" <<'EOF' || log "could not write summary.json"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
steps = {}
for line in (out / "summary.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    steps[name] = {"exit": int(rc), "seconds": float(secs)}
summary = {"machine": (out / "machine.txt").read_text(), "steps": steps}
if (out / "throughput.log").is_file():
    summary["throughput"] = [l for l in (out / "throughput.log").read_text().splitlines() if "img/s" in l]
report = out / "fast" / "report.json"
if report.is_file():
    r = json.loads(report.read_text())
    summary["fast"] = {"test_accuracy": r["accuracy"], "measured_on": r.get("measured_on"),
                       "wall_seconds": steps.get("fast", {}).get("seconds")}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=2))
EOF
