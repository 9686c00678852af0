"""A multi-label run answers, evaluates and exports on real pixels (CIFAR-10 mosaics): predict gives every label at
or above its threshold with its probability and the top-k, eval gives the figures of the run's report, and the
ONNX file records the task and thresholds, passes a label-set parity check and answers as the run folder does."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ROOT, SHARED_CIFAR, needs_weights, run_cli
from transferkit.checkpoint import read_card, update_card
from transferkit.predict import Predictor

pytestmark = needs_weights  # ImageNet features: the mosaics' answers differ image by image


@pytest.fixture(scope="module")
def ml_run(mosaic_csv, tmp_path_factory) -> Path:
    """A linear probe on the 160 mosaics (fp32, 32 px): thresholds chosen on its validation split."""
    out = tmp_path_factory.mktemp("mlrun") / "run"
    proc = run_cli("train", "--data", mosaic_csv, "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1",
                   "--strategy", "linear", "--epochs", "2", "--image-size", "32", "--precision", "fp32",
                   "--workers", "1", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="module")
def new_images(tmp_path_factory) -> Path:
    """Six mosaics the run never saw (another seed), at 32 px: the model's own input side, so the no-torch example
    reads them exactly as transferkit does."""
    spec = importlib.util.spec_from_file_location("multilabel_bench", ROOT / "benchmarks" / "multilabel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.build_mosaics(SHARED_CIFAR, tmp_path_factory.mktemp("new"), count=6, seed=1)
    folder = table.parent / "small"
    folder.mkdir()
    for f in sorted((table.parent / "images").glob("*.png")):
        Image.open(f).convert("RGB").resize((32, 32), Image.BILINEAR).save(folder / f.name)
    return folder


def _sigmoids(pred: Predictor, files: list[Path]) -> torch.Tensor:
    """Each label's sigmoid, computed here from the model's logits."""
    x = torch.cat([pred.preprocessing.to_input(pred.preprocessing.read(f)[None]) for f in files])
    with torch.no_grad():
        return torch.sigmoid(pred.model.cpu().float()(x).double())


def test_predictor_answers_every_label_at_or_above_its_threshold_and_the_top_k(ml_run, new_images):
    card = read_card(ml_run)
    assert card.task == "multilabel" and len(card.thresholds) == 10
    pred = Predictor.from_run(ml_run, device="cpu")
    files = sorted(new_images.glob("*.png"))
    answers = pred.predict(files, topk=3)
    probs = _sigmoids(pred, files)
    assert (probs.sum(1) - 1).abs().max() > 0.1  # a sigmoid per label, not a softmax over them
    some_left_out = False
    for answer, p in zip(answers, probs):
        wanted = {c for c, t, q in zip(card.classes, card.thresholds, p.tolist()) if q >= t}
        assert {c for c, _ in answer.labels} == wanted
        for c, q in answer.labels + answer.top:
            assert q == pytest.approx(p[card.classes.index(c)].item(), abs=1e-5)
        assert [q for _, q in answer.labels] == sorted((q for _, q in answer.labels), reverse=True)
        assert len(answer.top) == 3
        assert [q for _, q in answer.top] == pytest.approx(sorted(p.tolist(), reverse=True)[:3], abs=1e-5)
        some_left_out |= any(c not in wanted for c, _ in answer.top)
    # the thresholds decide, not the ranking: some top label falls below its own threshold
    assert some_left_out


def test_predict_json_text_and_csv_of_a_multilabel_run(ml_run, new_images, tmp_path):
    card = read_card(ml_run)
    proc = run_cli("predict", ml_run, new_images, "--json", "--topk", "2", "--csv", tmp_path / "p.csv")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["task"] == "multilabel" and out["thresholds"] == dict(zip(card.classes, card.thresholds))
    expected, _ = Predictor.from_run(ml_run, device="cpu").predict_paths(new_images, topk=2)
    assert out["predictions"] == expected and len(expected) == 6
    for row in out["predictions"]:
        assert all(r["prob"] >= out["thresholds"][r["label"]] for r in row["labels"])
        assert len(row["top"]) == 2
    with open(tmp_path / "p.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["file", "labels", "probs", "label_1", "prob_1", "label_2", "prob_2"]
    for row, answer in zip(table, out["predictions"]):
        assert row["labels"] == ";".join(r["label"] for r in answer["labels"])
        assert row["label_1"] == answer["top"][0]["label"]

    # no label reaches a threshold of 1: each image says so, and still shows its top labels
    strict = tmp_path / "strict"
    shutil.copytree(ml_run, strict)
    update_card(strict, thresholds=[1.0] * 10)
    proc = run_cli("predict", strict, new_images, "--topk", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 6 and all("no label at or above its threshold  (top 2: " in line for line in lines)


def test_eval_gives_the_figures_of_the_runs_report(ml_run):
    report = json.loads((ml_run / "report.json").read_text())
    proc = run_cli("eval", ml_run, "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    for key in ("task", "images", "map", "micro_f1", "macro_f1", "exact_match", "per_label"):
        assert got[key] == report[key], key
    assert got["thresholds_chosen_on"] == "validation" and "calibration" not in got
    assert [r["threshold"] for r in got["per_label"]] == pytest.approx(read_card(ml_run).thresholds)
    text = run_cli("eval", ml_run).stdout.splitlines()
    assert text[0].startswith("mAP ")
    per_label = [line for line in text if "threshold" in line]
    assert len(per_label) == 10 and all(" AP " in line for line in per_label)


def test_onnx_export_records_the_task_passes_label_set_parity_and_answers_as_the_run(ml_run, new_images, tmp_path):
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "model.onnx"
    proc = run_cli("export", ml_run, "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "label-set agreement 100.00%" in proc.stdout and "sigmoid difference" in proc.stdout
    rec = json.loads((tmp_path / "export.json").read_text())["model.onnx"]
    assert rec["parity"]["label_set_agreement"] == 1.0 and rec["parity"]["passed"]
    assert rec["parity"]["decisions_differing"] == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    card = read_card(ml_run)
    assert meta["task"] == "multilabel" and json.loads(meta["thresholds"]) == card.thresholds
    assert "sigmoid" in meta["output"]

    by_run = json.loads(run_cli("predict", ml_run, new_images, "--json", "--precision", "fp32").stdout)
    by_file = json.loads(run_cli("predict", out, new_images, "--json").stdout)
    assert by_file["thresholds"] == by_run["thresholds"]
    for a, b in zip(by_run["predictions"], by_file["predictions"]):
        assert [r["label"] for r in a["labels"]] == [r["label"] for r in b["labels"]]
        assert [r["label"] for r in a["top"]] == [r["label"] for r in b["top"]]
        assert [r["prob"] for r in a["top"]] == pytest.approx([r["prob"] for r in b["top"]], abs=1e-4)

    # the no-torch example reads task and thresholds from the file and lists the same labels
    files = sorted(new_images.glob("*.png"))
    example = subprocess.run([sys.executable, str(ROOT / "examples" / "onnx_classify.py"), str(out),
                              *map(str, files), "--topk", "2"], capture_output=True, text=True, timeout=120)
    assert example.returncode == 0, example.stderr
    for line, answer in zip(example.stdout.splitlines(), by_file["predictions"]):
        said = line.split(": ", 1)[1].split("  (top: ")[0]
        labels = [r["label"] for r in answer["labels"]]
        assert said == (", ".join(f"{c} {100 * r['prob']:.1f}%" for c, r in zip(labels, answer["labels"]))
                        or "no label at or above its threshold")

    refused = run_cli("export", ml_run, "--quantize", "int8", "--out", tmp_path / "q.onnx")
    assert refused.returncode == 2 and "multi-label" in refused.stderr and "drop --quantize" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "q.onnx").exists()
