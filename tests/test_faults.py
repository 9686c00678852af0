"""Never lose a run: kills, Ctrl-C, full disks, hostile files, broken images, NaNs, OOM, fuzzed input."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import transferkit.checkpoint as ckpt
from conftest import SHARED_CIFAR, cifar_folder, link_subset, run_cli
from transferkit import TrainConfig, TransferkitError, train

CLASSES = ["airplane", "cat", "ship"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return cifar_folder(tmp_path_factory, "tiny", 12, 6, CLASSES)


def train_args(data, out):
    return ["train", "--data", data, "--model", "resnet18", "--weights", "none", "--image-size", "32",
            "--epochs", "3", "--batch-size", "4", "--val-split", "0.25", "--strategy", "gradual",
            "--workers", "1", "--checkpoint-every", "1", "--out", out]


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "transferkit", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_checkpoints(proc, path, count, timeout=120):
    """Return once `path` has been (re)written `count` more times, or the process ended."""
    seen, last, deadline = 0, None, time.monotonic() + timeout
    while seen < count and proc.poll() is None and time.monotonic() < deadline:
        try:
            stamp = path.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = None
        if stamp is not None and stamp != last:
            seen, last = seen + 1, stamp
        time.sleep(0.002)


def kill_and_resume(p, run, counts, rng=None):
    """SIGKILL the training process `p` when last.pt has been written `counts[i]` times (a random jitter of up
    to 50 ms after it with `rng`), resume after each kill, and wait for the last process to finish; the kills."""
    kills = 0
    for count in counts:
        wait_for_checkpoints(p, run / "last.pt", count)
        if rng is not None:
            time.sleep(rng.uniform(0, 0.05))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        p = start("train", "--resume", run)
    assert p.wait() == 0, p.stderr.read()
    return kills


def outcome(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    keep = ("epoch", "train_loss", "train_acc", "val_acc", "lr_start", "lr_end", "backbone_frozen")
    return ([{k: r[k] for k in keep} for r in rows], json.loads((run / "report.json").read_text())["accuracy"],
            load_file(run / "model.safetensors"))


def same(a, b):
    assert a[0] == b[0] and a[1] == b[1]
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """The uninterrupted run that interrupted ones must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = run_cli(*train_args(tiny, out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_sigkill_at_random_points_then_resume_gives_identical_results(tiny, straight, tmp_path):
    run = tmp_path / "killed"
    rng = random.Random(7)
    # several points, across epochs; the jitter lands some kills mid-write
    kills = kill_and_resume(start(*train_args(tiny, run)), run, (1, 5, 9), rng)
    assert kills >= 2
    same(outcome(straight), outcome(run))


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny, straight, tmp_path):
    run = tmp_path / "interrupted"
    p = start(*train_args(tiny, run))
    wait_for_checkpoints(p, run / "last.pt", 3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert f"transferkit train --resume {run}" in err and "Traceback" not in err
    assert run_cli("train", "--resume", run).returncode == 0
    same(outcome(straight), outcome(run))


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    first_run = tmp_path.parent / f"{tmp_path.name}-first"
    first_run.mkdir()
    ckpt.save_last(tmp_path, {"epoch": 1, "w": torch.ones(3)})
    real_write = os.write

    def disk_full(fd, data):
        real_write(fd, data[: len(data) // 3])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(TransferkitError, match="No space left.*previous last.pt is untouched.*train --resume"):
        ckpt.save_last(tmp_path, {"epoch": 2, "w": torch.zeros(3)})
    # The first checkpoint of a run: nothing to keep, nothing to resume; the advice says so.
    with pytest.raises(TransferkitError) as first:
        ckpt.save_last(first_run, {"epoch": 1})
    assert "no last.pt was written" in str(first.value) and "--resume" not in str(first.value)
    monkeypatch.undo()
    state = ckpt.load_last(tmp_path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [f.name for f in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_a_folder_that_takes_no_new_files_is_a_sentence_and_changes_nothing(tmp_path):
    from transferkit.files import atomic_write

    with pytest.raises(TransferkitError, match="takes no new files.*nothing in it was changed"):
        atomic_write(tmp_path / "gone" / "report.md", "x")  # the folder is missing (or read-only, or full)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_carrying_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "data").mkdir()  # a resume whose data folder is missing would stop before reading last.pt
    (run / "config.yaml").write_text(TrainConfig.create(data=str(tmp_path / "data"), weights="none").to_yaml())
    torch.save({"model": Payload()}, run / "last.pt")
    proc = run_cli("train", "--resume", run)
    assert proc.returncode == 2 and "last.pt" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def _png_claiming(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_broken_files_are_listed_and_training_goes_on(tiny, tmp_path):
    data = tmp_path / "data"
    link_subset(SHARED_CIFAR / "train", data / "train", 8, CLASSES)
    link_subset(SHARED_CIFAR / "test", data / "test", 4, CLASSES)
    good = (data / "train" / "cat").iterdir().__next__().read_bytes()
    broken = {"train/cat/truncated.jpg": good[: len(good) // 3], "train/cat/zero.jpg": b"",
              "train/ship/text.jpg": b"this is not a picture", "test/ship/huge.png": _png_claiming(90000, 90000)}
    for name, raw in broken.items():
        (data / name).write_bytes(raw)
    result = train(TrainConfig.create(data=str(data), model="resnet18", weights="none", image_size=32, epochs=1,
                                      batch_size=8, val_split=0.25, out=str(tmp_path / "run"), workers=1))
    listed = (tmp_path / "run" / "skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted(str(data / n) for n in broken)
    assert all(line.split("\t")[1] for line in listed)  # every one with its reason
    assert "empty file" in "".join(listed)
    assert result.metrics["images"] == 12  # the test split without the broken file


def test_nan_loss_stops_with_step_lr_and_hint(tiny, tmp_path):
    cfg = TrainConfig.create(data=str(tiny), model="resnet18", weights="none", image_size=32, epochs=1,
                             batch_size=4, optimizer="sgd", lr=1e12, warmup_epochs=0, val_split=0.25,
                             out=str(tmp_path / "run"), workers=1, checkpoint_every=1)
    with pytest.raises(TransferkitError, match=r"loss became .* step \d+ \(lr [0-9.]+e\+1[12]\).*--lr"):
        train(cfg)
    if (tmp_path / "run" / "last.pt").exists():  # whatever was saved is finite
        state = ckpt.load_last(tmp_path / "run")
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_out_of_memory_in_the_first_steps_retries_in_smaller_passes_of_the_same_batch(tiny, tmp_path, monkeypatch,
                                                                                       caplog):
    """The run that continues is the run asked for: same batch and lr, the batch in smaller passes."""
    from transferkit.data import transforms

    real_call = transforms.TrainTransform.__call__
    most = {"images": 4}

    def small_memory(self, images, generator=None, **kw):
        if images.shape[0] > most["images"]:  # a training pass too large for this "device"
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_call(self, images, generator, **kw)

    monkeypatch.setattr(transforms.TrainTransform, "__call__", small_memory)
    cfg = TrainConfig.create(data=str(tiny), model="resnet18", weights="none", image_size=32, epochs=1,
                             batch_size=16, lr=2e-3, val_split=0.25, out=str(tmp_path / "run"), workers=1)
    result = train(cfg)
    saved = TrainConfig.from_yaml(tmp_path / "run" / "config.yaml")
    assert (saved.batch_size, saved.lr, saved.micro_batch) == (16, 2e-3, 4)
    assert "retrying from the start in passes of 8 images" in caplog.text
    assert "in passes of 4 images" in caplog.text and "batch 16 in passes of up to 4" in caplog.text
    assert result.metrics["images"] == 18

    most["images"] = 0  # not even one image fits: a clear error, not a loop
    with pytest.raises(TransferkitError, match=r"out of memory, and smaller passes would break BatchNorm.*frozen"):
        train(cfg.replace(out=str(tmp_path / "run2")))  # passes of 2 would leave single images in a batch of 11
    with pytest.raises(TransferkitError, match=r"out of memory in passes of 1 image\(s\) at 32 px; lower"):
        train(cfg.replace(batchnorm="frozen", out=str(tmp_path / "run3")))


def test_passes_of_one_image_under_batchnorm_are_refused_before_training(tiny, tmp_path):
    cfg = TrainConfig.create(data=str(tiny), model="resnet18", weights="none", image_size=32, epochs=1, batch_size=1,
                             val_split=0.25, out=str(tmp_path / "run"), workers=1)
    with pytest.raises(TransferkitError, match=r"a batch of 1 image\(s\) on 1 process\(es\) leaves passes of one "
                       r"image.*--batchnorm frozen"):
        train(cfg)
    with pytest.raises(TransferkitError, match=r"of 3 image\(s\) in passes of 2 .*--micro-batch 3 or more"):
        train(cfg.replace(batch_size=8, micro_batch=2, out=str(tmp_path / "run2")))  # 27 images: a last batch of 3
    assert train(cfg.replace(batchnorm="frozen", out=str(tmp_path / "run3"))).metrics["images"] == 18


def test_small_and_imbalanced_classes_get_a_warning(tmp_path, caplog):
    for c, n in {"many": 40, "few": 3}.items():
        (tmp_path / c).mkdir()
        for i in range(n):
            Image.new("RGB", (16, 16), (i * 5 % 255, 10 if c == "many" else 200, 0)).save(tmp_path / c / f"{i}.png")
    train(TrainConfig.create(data=str(tmp_path), model="resnet18", weights="none", image_size=32, epochs=1,
                             batch_size=8, val_split=0.3, out=str(tmp_path.parent / "imb"), workers=1,
                             class_weights="auto"))
    assert "very small classes in train: few (2)" in caplog.text
    caplog.clear()
    train(TrainConfig.create(data=str(tmp_path), model="resnet18", weights="none", image_size=32, epochs=1,
                             batch_size=8, val_split=0.3, out=str(tmp_path.parent / "imb2"), workers=1))
    assert "--class-weights auto" in caplog.text


def test_a_crash_inside_a_checkpoint_write_resumes_to_identical_results(tiny, tmp_path, monkeypatch):
    def cfg(out):
        return TrainConfig.create(data=str(tiny), model="resnet18", weights="none", image_size=32, epochs=2,
                                  batch_size=4, val_split=0.25, strategy="gradual", workers=1, checkpoint_every=1,
                                  out=str(out))

    straight = train(cfg(tmp_path / "straight"))
    real_fsync, calls = os.fsync, []

    def die_mid_write(fd):  # the temporary file is written, the rename has not happened
        calls.append(fd)
        if len(calls) == 9:
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", die_mid_write)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "crashed"))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert not list((tmp_path / "crashed").glob(".*.tmp"))  # no half-written file left behind
    resumed = train(resume=tmp_path / "crashed")
    same(outcome(straight.out_dir), outcome(resumed.out_dir))
