"""Imbalance end to end: balanced accuracy and macro-F1, --select-by, --sampler balanced, --patience."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

import transferkit.training.fit as fit
from conftest import SHARED_CIFAR, link_subset, run_cli
from test_faults import kill_and_resume, start
from transferkit import TrainConfig, train
from transferkit.report import accuracy_line, classification_metrics
from transferkit.task import Task

CLASSES = ["airplane", "cat", "ship"]


@pytest.fixture(scope="module")
def lopsided(tmp_path_factory):
    """Train: 16 airplanes, 16 cats, 4 ships (the shared CIFAR-10 images); test: 6 of each."""
    if not (SHARED_CIFAR / "train").is_dir():
        pytest.skip(f"shared CIFAR-10 folder not found at {SHARED_CIFAR}")
    root = tmp_path_factory.mktemp("lopsided")
    link_subset(SHARED_CIFAR / "train", root / "train", 16, CLASSES[:2])
    link_subset(SHARED_CIFAR / "train", root / "train", 4, CLASSES[2:])
    link_subset(SHARED_CIFAR / "test", root / "test", 6, CLASSES)
    return root


def quick(data, out, **settings):
    """A seconds-long run: a random resnet18's features at 32 px, a linear head on them."""
    base = dict(data=str(data), model="resnet18", weights="none", image_size=32, strategy="linear", epochs=3,
                batch_size=8, val_split=0.25, workers=1, out=str(out))
    return TrainConfig.create(**{**base, **settings})


def rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def card(run):
    return json.loads((run / "model.json").read_text())


# ---- the metrics -------------------------------------------------------------------------------------------------

def test_balanced_accuracy_and_macro_f1_against_a_hand_count():
    # 8 images of class 0, 2 of class 1, 2 of class 2; the model says 0 for all but one image of class 2.
    labels = torch.tensor([0] * 8 + [1] * 2 + [2] * 2)
    pred = torch.tensor([0] * 8 + [0] * 2 + [2, 0])
    logits = torch.nn.functional.one_hot(pred, 3).float()
    m = classification_metrics(logits, labels, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(9 / 12)
    assert m["balanced_accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)  # recalls 8/8, 0/2, 1/2
    f1_a = 2 * (8 / 11) * 1 / (8 / 11 + 1)  # precision 8/11, recall 1
    f1_c = 2 * 1 * 0.5 / 1.5
    assert m["macro_f1"] == pytest.approx((f1_a + 0 + f1_c) / 3)
    line = accuracy_line(m)
    assert "\n" not in line and "balanced accuracy 50.00%" in line and f"macro-F1 {100 * m['macro_f1']:.2f}%" in line


# ---- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "message"), [
    (["--select-by", "balanced-acuracy"], "did you mean 'balanced-accuracy'"),
    (["--select-by", "macro_f1"], "did you mean 'macro-f1'"),
    (["--patience", "0"], "patience must be at least 1"),
    (["--patience", "-3"], "patience must be at least 1"),
    (["--min-delta", "-0.1"], "min_delta must be >= 0"),
])
def test_bad_imbalance_flags_exit_2_with_the_fix(tmp_path, flags, message):
    (tmp_path / "data" / "a").mkdir(parents=True)
    proc = run_cli("train", "--data", tmp_path / "data", *flags, "--out", tmp_path / "run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("broken", ["not a picture", "truncated"])
def test_a_class_whose_training_files_all_fail_to_read_exits_2_by_name(tmp_path, broken):
    """Whether the header fails or only the pixels do (a truncated JPEG), the class is named, with --sampler
    balanced too (which would otherwise draw from a class with no images)."""
    data = tmp_path / "data"
    link_subset(SHARED_CIFAR / "train", data / "train", 6, ["cat", "ship"])
    link_subset(SHARED_CIFAR / "test", data / "test", 2, ["cat", "ship"])
    for f in (data / "train" / "ship").iterdir():  # every ship unreadable: the training split holds cats alone
        content = f.read_bytes()
        f.unlink()
        f.write_bytes(b"not a picture" if broken == "not a picture" else content[:-200])
    proc = run_cli("train", "--data", data, "--model", "resnet18", "--weights", "none", "--image-size", "32",
                   "--sampler", "balanced", "--val-split", "0", "--stream", "never", "--no-cache",
                   "--out", tmp_path / "run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "without a readable image: ship" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def test_patience_without_a_validation_split_exits_2_with_the_fix(lopsided, tmp_path):
    with pytest.raises(fit.TransferkitError, match="no validation split; use --val-split"):
        train(quick(lopsided, tmp_path / "run", val_split=0, patience=2))
    assert not (tmp_path / "run").exists()


# ---- the sampler -------------------------------------------------------------------------------------------------

def drawn_labels(monkeypatch, cfg):
    """Train `cfg`, returning the labels of every training image each step saw."""
    seen = []
    real = fit.engine.train_step

    def counting(model, optimizer, scheduler, images, labels, *args, **kwargs):
        seen.append(labels.clone())
        return real(model, optimizer, scheduler, images, labels, *args, **kwargs)

    monkeypatch.setattr(fit.engine, "train_step", counting)
    train(cfg)
    return torch.cat(seen)


def test_balanced_sampler_draws_every_class_equally_often_with_the_epoch_length(lopsided, tmp_path, monkeypatch):
    epochs = 6
    plain = drawn_labels(monkeypatch, quick(lopsided, tmp_path / "plain", epochs=epochs))
    balanced = drawn_labels(monkeypatch, quick(lopsided, tmp_path / "balanced", epochs=epochs, sampler="balanced"))
    train_images = len(plain) // epochs  # 27 of 36 (a quarter is held out for validation)
    assert len(balanced) == len(plain) == epochs * train_images
    assert torch.bincount(plain, minlength=3)[2] == epochs * 3  # the 3 ships left for training, once per epoch
    shares = torch.bincount(balanced, minlength=3) / len(balanced)
    assert all(0.25 < s < 0.42 for s in shares.tolist()), shares  # 1/3 each (162 draws: ~0.04 spread)
    assert "sampler: balanced" in (tmp_path / "balanced" / "report.md").read_text()


def test_balanced_sampler_draws_repeat_with_the_seed_in_a_finetune(lopsided, tmp_path, monkeypatch):
    a = drawn_labels(monkeypatch, quick(lopsided, tmp_path / "a", strategy="finetune", epochs=1, sampler="balanced"))
    b = drawn_labels(monkeypatch, quick(lopsided, tmp_path / "b", strategy="finetune", epochs=1, sampler="balanced"))
    assert torch.equal(a, b)  # drawn from the run's seeded generator, not from global randomness


# ---- selection and patience --------------------------------------------------------------------------------------

def scripted(monkeypatch, figures):
    """The epochs' validation figures taken from `figures` (one dict per epoch) instead of measured."""
    it = iter(figures)
    monkeypatch.setattr(Task, "val_figures", lambda self, logits, labels, classes: dict(next(it)))


def figs(acc, bal, f1, loss):
    return {"val_acc": acc, "val_balanced_acc": bal, "val_macro_f1": f1, "val_loss": loss}


# Each metric has its best epoch elsewhere: accuracy at 1, balanced accuracy at 2, macro-F1 at 3, loss at 4.
SCRIPT = [figs(0.9, 0.5, 0.5, 1.0), figs(0.8, 0.7, 0.6, 0.9), figs(0.7, 0.6, 0.8, 0.8), figs(0.6, 0.6, 0.7, 0.5)]
KEYS = {"accuracy": "val_acc", "balanced-accuracy": "val_balanced_acc", "macro-f1": "val_macro_f1",
        "loss": "val_loss"}


@pytest.mark.parametrize("select_by", list(KEYS))
def test_select_by_picks_the_epoch_its_metric_says(lopsided, tmp_path, monkeypatch, select_by):
    scripted(monkeypatch, SCRIPT)
    run = tmp_path / "run"
    train(quick(lopsided, run, epochs=4, select_by=select_by))
    history = rows(run)
    values = [h[KEYS[select_by]] for h in history]
    expected = history[(values.index(min(values)) if select_by == "loss" else values.index(max(values)))]["epoch"]
    assert card(run)["best_epoch"] == expected == {"accuracy": 1, "balanced-accuracy": 2, "macro-f1": 3,
                                                   "loss": 4}[select_by]
    assert f"selected: epoch {expected}, val {select_by}" in (run / "report.md").read_text()


def test_select_by_on_real_figures_matches_metrics_jsonl(lopsided, tmp_path):
    run = tmp_path / "run"
    result = train(quick(lopsided, run, epochs=4, lr=3e-2, select_by="balanced-accuracy"))
    history = rows(run)
    best = max(history, key=lambda h: h["val_balanced_acc"])  # the first of equals, as selection keeps it
    assert card(run)["best_epoch"] == best["epoch"]
    assert all(0 <= h["val_balanced_acc"] <= 1 and h["val_loss"] > 0 for h in history)
    report = (run / "report.md").read_text()
    assert f"| balanced accuracy (mean recall of the classes) | {100 * result.metrics['balanced_accuracy']:.2f}% |" \
        in report and "| macro-F1" in report


def test_patience_stops_when_the_metric_has_not_improved_for_n_epochs(lopsided, tmp_path, monkeypatch):
    # best at epoch 2; epochs 3 and 4 bring no gain: with --patience 2 the run ends after epoch 4 of 8.
    scripted(monkeypatch, [figs(a, a, a, 1.0) for a in (0.5, 0.6, 0.6, 0.55, 0.9, 0.9, 0.9, 0.9)])
    run = tmp_path / "run"
    train(quick(lopsided, run, epochs=8, patience=2))
    assert [h["epoch"] for h in rows(run)] == [1, 2, 3, 4]
    assert card(run)["best_epoch"] == 2
    assert "stopped early after epoch 4: val accuracy did not improve by more than 0 for 2 epochs" in \
        (run / "report.md").read_text()
    assert "early stop after epoch 4 of 8" in (run / "train.log").read_text()
    # A resume (e.g. with more epochs) finds the counter where it was: nothing more to train.
    scripted(monkeypatch, [])
    train(resume=run, epochs=10)
    assert [h["epoch"] for h in rows(run)] == [1, 2, 3, 4]


def test_min_delta_counts_only_gains_above_it(lopsided, tmp_path, monkeypatch):
    # +0.005 and +0.009 over epoch 1 are not gains of more than 0.01: stopped after epoch 3 of 5, epoch 1 kept.
    scripted(monkeypatch, [figs(a, a, a, 1.0) for a in (0.5, 0.505, 0.509, 0.9, 0.9)])
    run = tmp_path / "run"
    train(quick(lopsided, run, epochs=5, patience=2, min_delta=0.01))
    assert [h["epoch"] for h in rows(run)] == [1, 2, 3] and card(run)["best_epoch"] == 1


def test_without_patience_every_epoch_trains(lopsided, tmp_path, monkeypatch):
    scripted(monkeypatch, [figs(a, a, a, 1.0) for a in (0.9, 0.1, 0.1, 0.1)])
    run = tmp_path / "run"
    train(quick(lopsided, run, epochs=4))
    assert len(rows(run)) == 4 and "stopped early" not in (run / "report.md").read_text()


# ---- resume stays exact ------------------------------------------------------------------------------------------

def fault_args(data, out):
    # --select-by loss with --min-delta 100: no epoch after the first can gain, so --patience 2 stops after
    # epoch 3 of 5, whatever the figures; the kills land before and after that decision.
    return ["train", "--data", data, "--model", "resnet18", "--weights", "none", "--image-size", "32",
            "--epochs", "5", "--batch-size", "4", "--val-split", "0.25", "--strategy", "gradual",
            "--sampler", "balanced", "--patience", "2", "--select-by", "loss", "--min-delta", "100",
            "--workers", "1", "--checkpoint-every", "1", "--out", out]


def outcome(run):
    keep = ("epoch", "train_loss", "train_acc", "val_acc", "val_balanced_acc", "val_macro_f1", "val_loss",
            "lr_start", "lr_end")
    return ([{k: r[k] for k in keep} for r in rows(run)], json.loads((run / "report.json").read_text()),
            load_file(run / "model.safetensors"), card(run)["best_epoch"])


def test_sigkill_then_resume_with_patience_and_balanced_sampler_is_bit_identical(lopsided, tmp_path):
    straight = tmp_path / "straight"
    proc = run_cli(*fault_args(lopsided, straight))
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "killed"
    # epoch 1, epoch 2, then the end of epoch 3: the stop decided, not yet evaluated
    assert kill_and_resume(start(*fault_args(lopsided, run)), run, (2, 7, 12), random.Random(11)) >= 2
    a, b = outcome(straight), outcome(run)
    assert [r["epoch"] for r in a[0]] == [1, 2, 3] and a[3] == 1
    assert a[0] == b[0] and a[1] == b[1] and a[3] == b[3]
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def test_two_processes_draw_and_train_what_one_process_does_with_the_balanced_sampler(lopsided, tmp_path):
    from test_distributed import ARGS, assert_same_training, torchrun

    # batch 9: the 27 training images make 3 whole batches on one process and on two
    args = ["train", "--data", lopsided, *[a if a != "16" else "9" for a in ARGS], "--sampler", "balanced",
            "--epochs", "2"]
    one = run_cli(*args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stdout + two.stderr
    assert_same_training(tmp_path / "one", tmp_path / "two")
