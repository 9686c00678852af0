"""torchrun on the CPU (gloo): two processes train exactly what one process trains, and survive a dead worker."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cifar_folder, needs_weights, run_cli
from transferkit.data.preprocess import Preprocessing
from transferkit.data.transforms import TrainTransform
from transferkit.runtime import Dist

# Frozen BatchNorm statistics, no dropout and fp32 (bf16 rounds each pass differently): nothing in
# this run depends on how a batch is split.
ARGS = ["--model", "resnet18", "--weights", "none", "--backbone-lr-mult", "0.1", "--image-size", "32",
        "--batch-size", "16", "--val-split", "0.25", "--batchnorm", "frozen", "--precision", "fp32", "--workers", "1",
        "--epochs", "3"]


@pytest.mark.parametrize("n", [0, 1, 7, 16, 33])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shares_of_a_batch_cover_it_once_and_differ_by_at_most_one(n, world):
    shares = [Dist(rank=r, world=world).shard(n) for r in range(world)]
    assert [i for s in shares for i in range(n)[s]] == list(range(n))
    sizes = [len(range(n)[s]) for s in shares]
    assert max(sizes) - min(sizes) <= 1


def test_the_random_crops_of_a_share_are_those_of_the_whole_batch():
    images = torch.randint(0, 256, (10, 3, 24, 24), dtype=torch.uint8)
    tf = TrainTransform(Preprocessing(16, 18, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    whole = tf(images, torch.Generator().manual_seed(3))
    parts = []
    for rank in range(3):
        rows = Dist(rank=rank, world=3).shard(10)
        parts.append(tf(images[rows], torch.Generator().manual_seed(3), part=(rows, 10)))
    torch.testing.assert_close(torch.cat(parts), whole)
    assert not torch.allclose(parts[0], tf(images[:4], torch.Generator().manual_seed(3)))  # not just any crops


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return cifar_folder(tmp_path_factory, "ddp-data", 24, 10, ["airplane", "cat", "ship", "truck"])


def torchrun(*args, procs: int = 2, restarts: int = 0, popen: bool = False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           f"--max-restarts={restarts}", "-m", "transferkit", *map(str, args)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_accuracy(run: Path) -> float:
    return json.loads((run / "report.json").read_text())["accuracy"]


test_accuracy.__test__ = False  # a helper, not a test


def assert_same_training(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4, msg=f"{k} differs")
    for ra, rb in zip(history(a), history(b), strict=True):
        assert (ra["epoch"], ra["train_acc"], ra["val_acc"]) == (rb["epoch"], rb["train_acc"], rb["val_acc"])
        # fp32 sums of other shapes (a batch shared by two processes) round differently: 6e-5 on an Intel AMX CPU
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
    assert test_accuracy(a) == test_accuracy(b)


@pytest.fixture(scope="module")
def one_and_two(data, tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("ddp-runs")
    single = run_cli("train", "--data", data, *ARGS, "--out", root / "one" / "run")
    assert single.returncode == 0, single.stderr
    two = torchrun("train", "--data", data, *ARGS, "--out", root / "two" / "run")
    assert two.returncode == 0, two.stdout + two.stderr
    return root / "one" / "run", root / "two" / "run", two


def test_two_processes_train_what_one_process_trains(one_and_two):
    one, two, proc = one_and_two
    assert_same_training(one, two)
    assert "torchrun: 2 processes, global batch 16 (8 per process)" in proc.stderr
    # Rank 0 alone writes the one run folder and prints the one result.
    assert [p.name for p in two.parent.iterdir()] == ["run"]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert [line.startswith("accuracy ") for line in proc.stdout.splitlines()].count(True) == 1
    assert proc.stderr.count("epoch 3/3") == 1


def _worker_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes."""
    found = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                env = dict(x.split("=", 1) for x in (d / "environ").read_text().split("\0") if "=" in x)
                found[int(env["RANK"])] = int(d.name)
        except (OSError, KeyError, ValueError):
            continue
    return found


def test_a_killed_worker_is_restarted_and_the_job_finishes_from_the_checkpoint(data, one_and_two, tmp_path):
    _, two, _ = one_and_two
    out = tmp_path / "killed"
    job = torchrun("train", "--data", data, *ARGS, "--checkpoint-every", "1", "--out", out, restarts=1, popen=True)
    try:
        deadline, state = time.monotonic() + 300, None
        while time.monotonic() < deadline and job.poll() is None:  # wait for a mid-epoch checkpoint of epoch 2
            time.sleep(0.1)
            if (out / "last.pt").exists():
                state = torch.load(out / "last.pt", weights_only=True)
                if state["epoch"] == 2 and state["step"] is not None:
                    break
        else:
            pytest.fail("the job never wrote a mid-epoch checkpoint in epoch 2")
        os.kill(_worker_pids(job.pid)[1], signal.SIGKILL)
        output, _ = job.communicate(timeout=300)
    finally:
        job.kill()
    assert job.returncode == 0, output
    assert "torchrun restart 1: resuming" in output
    # From the checkpoint seen before the kill or a later one (the job goes on for a moment), not from scratch.
    where = re.search(rf"resuming {re.escape(str(out))} after epoch (\d+)(?:, step (\d+)/5)?", output)
    assert where and (int(where[1]), int(where[2] or 5)) >= (2, state["step"])
    assert_same_training(two, out)  # the restarted job ends where the uninterrupted one did


@needs_weights
def test_linear_probe_features_are_shared_out_and_match_one_process(data, tmp_path):
    args = ["--data", data, "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--strategy", "linear",
            "--precision", "fp32", "--image-size", "32", "--epochs", "2", "--batch-size", "16", "--val-split", "0.25",
            "--workers", "1", "--no-cache"]
    single = run_cli("train", *args, "--out", tmp_path / "one")
    assert single.returncode == 0, single.stderr
    two = torchrun("train", *args, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stdout + two.stderr
    assert "features of 72 images computed" in two.stderr
    assert_same_training(tmp_path / "one", tmp_path / "two")


def test_a_global_batch_too_small_for_the_processes_is_refused(data, tmp_path):
    proc = torchrun("train", "--data", data, *ARGS, "--batch-size", "3", "--out", tmp_path / "r")
    assert proc.returncode != 0
    assert proc.stderr.count("error: --batch-size 3 is the global batch") >= 1
    assert "--batch-size 3 is the global batch, shared by 2 processes; it must be at least 4" in proc.stderr


def test_ctrl_c_under_torchrun_saves_and_resume_under_torchrun_finishes_the_same(data, one_and_two, tmp_path):
    _, two, _ = one_and_two
    out = tmp_path / "stopped"
    job = torchrun("train", "--data", data, *ARGS, "--checkpoint-every", "1", "--out", out, popen=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None and not (out / "last.pt").exists():
            time.sleep(0.05)  # after the first step's checkpoint every rank is in the training loop
        job.send_signal(signal.SIGINT)  # torchrun passes it on to its workers
        output, _ = job.communicate(timeout=300)
    finally:
        job.kill()
    assert job.returncode != 0
    assert f"checkpoint saved. Resume with: torchrun --nproc_per_node=2 -m transferkit train --resume {out}" in output
    assert output.count("checkpoint saved") == 1  # rank 0 speaks for the job
    resumed = torchrun("train", "--resume", out)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming {out} after epoch" in resumed.stderr
    assert_same_training(two, out)
