"""Data that changes under a run: files deleted or a class folder renamed mid-run, folders this user
may not read, and what a run without a terminal prints while it trains."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import sys

import pytest
import torch

import transferkit.training.loop as loop
from conftest import SHARED_CIFAR, link_subset
from transferkit import TrainConfig, TransferkitError, logs, train
from transferkit.checkpoint import load_last, save_last
from transferkit.data.preprocess import Preprocessing
from transferkit.data.sources import load_source
from transferkit.training.state import lr_factor

CLASSES = ["airplane", "cat", "ship"]


@pytest.fixture
def data(tmp_path):
    """train: 12 images a class (27 train, 9 val once carved); test: 8 a class. Copies, not links:
    the tests delete and rename them."""
    if not (SHARED_CIFAR / "train").is_dir():
        pytest.skip(f"shared CIFAR-10 folder not found at {SHARED_CIFAR}")
    root = tmp_path / "data"
    link_subset(SHARED_CIFAR / "train", tmp_path / "links" / "train", 12, CLASSES)
    link_subset(SHARED_CIFAR / "test", tmp_path / "links" / "test", 8, CLASSES)
    shutil.copytree(tmp_path / "links", root, symlinks=False)
    return root


def streamed(data, out, **kw):
    return TrainConfig.create(**{**dict(
        data=str(data), model="resnet18", weights="none", image_size=32, epochs=2, batch_size=4,
        val_split=0.25, strategy="finetune", workers=0, stream="always", cache=False,
        out=str(out)), **kw})


def after_epoch(monkeypatch, epoch, change):
    """Run `change()` once, after `epoch` (its validation included)."""
    real, seen = loop.validate, []

    def validate(*args, **kw):
        figures = real(*args, **kw)
        seen.append(1)
        if len(seen) == epoch:
            change()
        return figures

    monkeypatch.setattr(loop, "validate", validate)


def test_files_deleted_mid_run_are_left_out_listed_and_never_scored(data, tmp_path, monkeypatch,
                                                                    caplog):
    train_file = sorted((data / "train" / "cat").iterdir())[0]
    test_file = sorted((data / "test" / "ship").iterdir())[0]
    run = tmp_path / "run"
    # after epoch 1: one training image (1 of 27, or of 9 in val) and one test image (1 of 24) go
    kept = test_file.read_bytes()
    after_epoch(monkeypatch, 1, lambda: (train_file.unlink(), test_file.unlink()))
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        result = train(streamed(data, run))
    assert result.metrics["images"] == 23  # the deleted test image is not scored as a black one
    listed = {line.split("\t")[0] for line in (run / "skipped.txt").read_text().splitlines()}
    assert {str(train_file), str(test_file)} <= listed
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[1].get("train_unread", 0) + rows[1].get("val_unread", 0) == 1
    report = (run / "report.md").read_text()
    assert "could no longer be read" in report and "23 images" in report
    said = [r for r in caplog.records if str(train_file) in r.getMessage()]
    assert 1 <= len(said) <= 2  # once in the epoch's summary, not once per image per batch

    # `transferkit eval` of a streamed split: a file that goes while it is scored is left out too
    test_file.write_bytes(kept)
    import transferkit.evaluate as ev
    from transferkit.data import folders

    real_evaluate, other = ev.evaluate, sorted((data / "test" / "cat").iterdir())[0]
    monkeypatch.setattr(folders, "_streams", lambda *a: True)
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: (other.unlink(), real_evaluate(*a, **k))[1])
    metrics, said, _ = ev.evaluate_run(run, device="cpu", workers=0)
    assert metrics["images"] == 23 and "1 that could no longer be read left out" in said


def test_a_class_folder_renamed_mid_run_stops_with_a_sentence_and_resumes(data, tmp_path,
                                                                         monkeypatch):
    run = tmp_path / "run"
    cat, moved = data / "train" / "cat", data / "train" / ".cat-moved"
    (data / "train" / "ship" / "broken.png").write_bytes(b"not a png")  # skipped at every start
    after_epoch(monkeypatch, 1, lambda: cat.rename(moved))
    with pytest.raises(TransferkitError, match=r"the data changed under the run: \d+ of 27 "
                       r"training images could no longer be read, e\.g\. .*cat") as e:
        train(streamed(data, run))
    assert f"transferkit train --resume {run}" in str(e.value)
    saved = load_last(run)
    assert saved["epoch"] == 2 and saved["step"] is not None  # mid-epoch 2: nothing trained black
    moved.rename(cat)  # the change above ran once: the resume reads every file
    resumed = train(resume=run)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert not any(h.get("train_unread") for h in resumed.history)
    listed = (run / "skipped.txt").read_text()
    assert "broken.png" in listed and "could no longer be read" in listed  # the resume keeps both
    assert "1 unreadable or refused file(s) of the data left out at the start" in (run / "report.md").read_text()


def test_a_class_folder_this_user_may_not_read_is_named_with_the_reason(tmp_path, monkeypatch):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / c / f"{i}.png")
    real = os.scandir

    def scandir(path="."):  # what mode 000 does to a user who is not root
        if os.fspath(path).endswith("dog"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(TransferkitError) as e:
        load_source(str(tmp_path), preprocessing=Preprocessing(8, 8), splits=("train",),
                    use_cache=False)
    assert "could not be read: dog (Permission denied)" in str(e.value)
    assert "without images" not in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 folder (the monkeypatched "
                    "test above covers it)")
def test_a_mode_000_class_folder_is_named_with_the_reason(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / c / "0.png")
    (tmp_path / "dog").chmod(0)
    try:
        with pytest.raises(TransferkitError, match=r"dog \(Permission denied\)"):
            load_source(str(tmp_path), preprocessing=Preprocessing(8, 8), splits=("train",),
                        use_cache=False)
    finally:
        (tmp_path / "dog").chmod(0o755)


def test_without_a_terminal_a_progress_line_comes_at_a_steady_interval(monkeypatch, caplog):
    monkeypatch.setattr(logs, "PLAIN_PROGRESS_SECONDS", 0.0, raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, nohup, CI
    running = loop.Tally()
    progress = logs.EpochProgress("epoch 1/3", 10, 0, show=True, log_every=0, world=1)
    with caplog.at_level(logging.INFO, logger="transferkit"):
        for step in range(1, 4):
            running.add(torch.tensor(2.0), torch.tensor(1), 4)
            progress.step(step, torch.tensor(2.0), 4, running)
    progress.close()
    lines = [r.getMessage() for r in caplog.records if "left in the epoch" in r.getMessage()]
    assert len(lines) == 3 and lines[2].startswith("epoch 1/3: step 3/10, loss 0.500, ")
    assert "img/s" in lines[2]


def test_a_resumed_epoch_reads_its_first_steps_lr(tiny_run_args, tmp_path, monkeypatch):
    """A last.pt whose sums do not carry the epoch's first lr (written by an earlier transferkit):
    the row still gives the lr of the epoch's first step, not of the first step after the resume."""
    cfg = tiny_run_args(tmp_path / "run")
    real, saves = loop.save_last, []

    def save_then_die(out, state):
        real(out, state)
        saves.append(1)
        if len(saves) == 9:  # epoch 2, step 2 of 7
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_last", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(loop, "save_last", real)
    saved = load_last(tmp_path / "run")
    assert saved["epoch"] == 2 and saved["step"]
    for k in ("lr_start", "lr_end"):
        saved["running"].pop(k)
    save_last(tmp_path / "run", saved)
    history = train(resume=tmp_path / "run").history
    steps = 7
    first = cfg.lr * lr_factor(cfg.schedule, steps * cfg.epochs, round(cfg.warmup_epochs * steps))(
        steps)
    assert history[1]["lr_start"] == pytest.approx(first)


@pytest.fixture
def tiny_run_args(data):
    def make(out):
        return TrainConfig.create(data=str(data), model="resnet18", weights="none", image_size=32,
                                  epochs=2, batch_size=4, val_split=0.25, workers=0,
                                  checkpoint_every=1, cache=False, out=str(out))
    return make


def test_a_batch_leaves_out_what_no_longer_reads_in_each_processs_share(tmp_path):
    """Training keeps a batch's size (another image of the batch takes the place, with its label),
    also for a torchrun process whose whole share went; scoring drops the rows; a batch of which
    nothing reads comes back empty."""
    from PIL import Image

    from transferkit.data.folders import FileImages

    files = []
    for i in range(6):
        files.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), (40 * i + 20, 0, 0)).save(files[-1])
    images = FileImages(files, Preprocessing(8, 8), 8)
    labels = torch.arange(6)
    for i in (3, 4, 5):
        files[i].unlink()
    x, y, unread = images.batch(torch.arange(6), labels, fill=True)
    assert len(y) == 6 and set(y[3:].tolist()) <= {0, 1, 2} and len(unread) == 3
    assert all(torch.equal(x[i], x[int(y[i])]) for i in range(6))  # each row its label's image
    x, y, unread = images.batch(torch.arange(6), labels, rows=slice(3, 6), fill=True)
    assert y[3:].tolist() == [0, 0, 0] and x[3:].float().mean() > 0  # the share borrows row 0
    assert [f for f, _ in unread] == [str(f) for f in files[3:]]  # its own files alone
    x, y, _ = images.batch(torch.arange(6), labels)
    assert y.tolist() == [0, 1, 2] and len(x) == 3
    x, y, _ = images.batch(torch.tensor([3, 4, 5]), labels[3:], fill=True)
    assert len(x) == len(y) == 0
