"""Multi-label training end to end on real pixels (CIFAR-10 mosaics): the sigmoid head learns, mAP heads every
figure, thresholds are chosen on validation, a SIGKILLed run resumes bit-identically, two torchrun processes train
what one does, and settings a multi-label run cannot honour are refused in a sentence."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from test_distributed import torchrun
from test_faults import kill_and_resume, start

# random weights at 32 px, fp32, BatchNorm frozen: seconds, and nothing depends on how a batch is split
ARGS = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "16",
        "--val-split", "0.25", "--precision", "fp32", "--workers", "1", "--batchnorm", "frozen",
        "--strategy", "gradual", "--epochs", "3", "--lr", "0.003"]


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(mosaic_csv, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("ml") / "run"
    proc = run_cli("train", "--data", mosaic_csv, *ARGS, "--checkpoint-every", "2", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def test_a_label_file_with_several_labels_trains_a_sigmoid_head_and_reports_map(straight):
    run, proc = straight
    assert "multi-label" in proc.stderr  # the log says which task it chose
    card = json.loads((run / "model.json").read_text())
    assert card["task"] == "multilabel"
    assert len(card["thresholds"]) == len(card["classes"]) == 10
    assert all(0 <= t <= 1 for t in card["thresholds"])
    assert len(set(card["thresholds"])) > 1  # chosen per label on validation, not one constant
    history = rows(run)
    assert all("val_map" in r and "val_acc" not in r for r in history)
    assert all(0 < r["val_map"] <= 1 for r in history)
    report = json.loads((run / "report.json").read_text())
    assert report["task"] == "multilabel" and 0 < report["map"] <= 1
    assert len(report["per_label"]) == 10
    assert "mAP" in proc.stdout  # the closing line heads with mAP, not accuracy
    config = (run / "config.yaml").read_text()
    assert "task: multilabel" in config and "select_by: map" in config


def test_sigkill_then_resume_of_a_multilabel_run_is_bit_identical(mosaic_csv, straight, tmp_path):
    run = tmp_path / "killed"
    p = start("train", "--data", mosaic_csv, *ARGS, "--checkpoint-every", "2", "--out", run)
    assert kill_and_resume(p, run, (2, 5), random.Random(3)) >= 1
    assert rows(run) == [{**r, "seconds": rk["seconds"], "img_per_s": rk["img_per_s"]}
                         for r, rk in zip(rows(straight[0]), rows(run), strict=True)]
    a, b = load_file(straight[0] / "model.safetensors"), load_file(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run / "model.json").read_text())["thresholds"] == \
        json.loads((straight[0] / "model.json").read_text())["thresholds"]


def test_two_torchrun_processes_train_the_multilabel_run_one_process_trains(mosaic_csv, straight, tmp_path):
    two = torchrun("train", "--data", mosaic_csv, *ARGS, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stdout
    a, b = load_file(straight[0] / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=f"{k} differs")
    for ra, rb in zip(rows(straight[0]), rows(tmp_path / "two"), strict=True):
        # logits equal to ~1e-5 (fp32 sums of other shapes) may swap two near-tied images in a label's ranking
        assert ra["val_map"] == pytest.approx(rb["val_map"], abs=1e-3)
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)


@pytest.mark.parametrize("option, says", [
    (["--sampler", "balanced"], "--class-weights auto"),
    (["--calibrate"], "drop --calibrate"),
    (["--select-by", "balanced-accuracy"], "selects by map"),
])
def test_settings_a_multilabel_run_cannot_honour_are_one_sentence(mosaic_csv, tmp_path, option, says):
    proc = run_cli("train", "--data", mosaic_csv, *ARGS, *option, "--out", tmp_path / "run")
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def test_select_by_map_on_one_class_per_image_is_refused(cifar_small, tmp_path):
    proc = run_cli("train", "--data", cifar_small, *ARGS, "--select-by", "map", "--out", tmp_path / "run")
    assert proc.returncode == 2 and "--select-by map is for multi-label data" in proc.stderr


def test_the_asymmetric_loss_leaves_easy_negatives_out_and_keeps_positives_plain():
    from transferkit.task import Task

    bce, asl = Task("multilabel"), Task("multilabel", "asl")
    easy_negative = torch.tensor([[-5.0]])  # p = 0.007 < the 0.05 shift
    assert asl.loss(easy_negative, torch.tensor([[0]])).item() == 0.0
    assert bce.loss(easy_negative, torch.tensor([[0]])).item() > 0
    positive, yes = torch.tensor([[0.3]]), torch.tensor([[1]])  # positives: plain -log p, as binary cross-entropy
    assert asl.loss(positive, yes).item() == pytest.approx(bce.loss(positive, yes).item())
    hard_negative = torch.tensor([[2.0]])  # p = 0.88: still costs, less than under BCE
    assert 0 < asl.loss(hard_negative, torch.tensor([[0]])).item() < bce.loss(hard_negative, torch.tensor([[0]])).item()


def test_multilabel_loss_asl_trains_and_the_report_says_which_loss(mosaic_csv, tmp_path):
    out = tmp_path / "asl"
    proc = run_cli("train", "--data", mosaic_csv, *ARGS[:-6], "--strategy", "linear", "--epochs", "1",
                   "--multilabel-loss", "asl", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "multilabel_loss: asl" in (out / "config.yaml").read_text()
    assert "asymmetric loss" in (out / "report.md").read_text()


def test_epoch_figures_are_at_the_thresholds_those_weights_would_get_not_at_half():
    from transferkit.task import Task

    # every score below 0.5, yet perfectly ranked: at 0.5 nothing is answered (F1 0), at the chosen thresholds all
    logits = torch.tensor([[-0.2, -3.0], [-3.0, -0.1], [-2.5, -2.9]])
    labels = torch.tensor([[1, 0], [0, 1], [0, 0]])
    figures = Task("multilabel").val_figures(logits, labels, ["cat", "dog"])
    assert figures["val_macro_f1"] == 1.0 and figures["val_exact_match"] == 1.0 and figures["val_map"] == 1.0
