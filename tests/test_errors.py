"""Error analysis (issue 14): errors.csv, the top-losses sheet, most confused pairs, predict --csv."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import _have_mobilenet_weights, run_cli
from transferkit.data.preprocess import Preprocessing
from transferkit.data.sources import Split
from transferkit.predict import Predictor
from transferkit.report.error_analysis import top_losses_png, write_errors


@pytest.fixture(scope="module")
def fp32_run(cifar_small, tmp_path_factory) -> Path:
    """A real 2-epoch linear probe on the CIFAR subset in fp32, so a recomputation agrees to 1e-4 (bf16 does not)."""
    if not _have_mobilenet_weights():
        pytest.skip("MobileNetV2 IMAGENET1K_V1 weights not on this machine")
    out = tmp_path_factory.mktemp("errors") / "run"
    proc = run_cli("train", "--data", cifar_small, "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1",
                   "--strategy", "linear", "--epochs", "2", "--lr", "3e-3", "--image-size", "64", "--batch-size", "32",
                   "--val-split", "0.2", "--precision", "fp32", "--device", "cpu", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_errors_csv_matches_the_saved_model(fp32_run):
    """Each errors.csv row is what the saved model says about that file; one row per wrong prediction."""
    out = fp32_run
    rows = _rows(out / "errors.csv")
    report = json.loads((out / "report.json").read_text())
    confusion = report["confusion"]
    wrong = sum(n for i, row in enumerate(confusion) for j, n in enumerate(row) if i != j)
    assert len(rows) == wrong > 0
    losses = [float(r["loss"]) for r in rows]
    assert losses == sorted(losses, reverse=True)
    pred = Predictor.from_run(out, device="cpu")
    again = dict((str(p), dict(top)) for p, top in pred.predict_files([r["file"] for r in rows],
                                                                       topk=len(pred.classes)))
    for r in rows:
        probs = again[r["file"]]
        assert Path(r["file"]).parent.name == r["true"]  # the folder is the true class
        assert max(probs, key=probs.get) == r["predicted"] != r["true"]
        assert float(r["prob_true"]) == pytest.approx(probs[r["true"]], abs=1e-4)
        assert float(r["prob_predicted"]) == pytest.approx(probs[r["predicted"]], abs=1e-4)
        assert float(r["loss"]) == pytest.approx(-math.log(probs[r["true"]]), rel=1e-3, abs=1e-4)
    text = (out / "report.md").read_text()
    assert "](errors.csv)" in text and "](top_losses.png)" in text
    assert "<h2>Top losses</h2>" in (out / "report.html").read_text()  # the page shows the sheet too


def test_top_losses_sheet_has_25_tiles(fp32_run):
    out = fp32_run
    wrong = len(_rows(out / "errors.csv"))
    with Image.open(out / "top_losses.png") as im:
        assert im.text["tiles"] == str(min(25, wrong))
        assert im.text["grid"] == "5x5" if wrong >= 25 else True
        assert im.width >= 5 * 200  # tiles big enough to see


def test_most_confused_pairs_equal_a_count_of_errors_csv(fp32_run):
    """Both directions listed separately; the counts are those of errors.csv, the largest first."""
    out = fp32_run
    counted = Counter((r["true"], r["predicted"]) for r in _rows(out / "errors.csv"))
    listed = json.loads((out / "report.json").read_text())["most_confused"]
    assert listed, "no pairs listed"
    assert [p["images"] for p in listed] == sorted((p["images"] for p in listed), reverse=True)
    for p in listed:
        assert counted[(p["true"], p["predicted"])] == p["images"]
    shown = {(p["true"], p["predicted"]) for p in listed}
    assert all(n <= listed[-1]["images"] for pair, n in counted.items() if pair not in shown)
    assert len(listed) == min(20, len(counted))
    text = (out / "report.md").read_text()
    first = listed[0]
    assert f"| {first['true']} → {first['predicted']} | {first['images']} |" in text


def test_eval_writes_its_errors_beside_its_report(fp32_run, tmp_path):
    """eval on the run's test split finds the same wrong images, named like its report."""
    out = fp32_run
    proc = run_cli("eval", out, "--device", "cpu", "--report-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    reports = list(tmp_path.glob("eval-*.md"))
    assert len(reports) == 1
    stem = reports[0].stem
    rows = _rows(tmp_path / f"{stem}_errors.csv")
    trained = _rows(out / "errors.csv")
    assert [(r["file"], r["predicted"]) for r in rows] == [(r["file"], r["predicted"]) for r in trained]
    for a, b in zip(rows, trained):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-3, abs=1e-4)
    assert (tmp_path / f"{stem}_top_losses.png").is_file()
    text = reports[0].read_text()
    assert f"]({stem}_errors.csv)" in text and f"]({stem}_top_losses.png)" in text
    assert json.loads((tmp_path / f"{stem}.json").read_text())["errors"]["errors"] == len(rows)


def _photos(n: int) -> torch.Tensor:
    from skimage import data

    pics = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    return torch.stack([torch.from_numpy(pics[i % 4][:300, :300].copy()).permute(2, 0, 1) for i in range(n)])


@pytest.mark.parametrize("classes", [["cat", "dog"], [f"class {i}" for i in range(10)],
                                     ["a very long class name that goes on and on", "another rather long name too"]])
def test_sheet_for_2_10_classes_and_long_names(classes, tmp_path):
    """A named data set (no files): the index column; the sheet draws one tile per error, at most 25."""
    torch.manual_seed(0)
    n = 40
    labels = torch.arange(n) % len(classes)
    logits = torch.randn(n, len(classes)) * 3
    split = Split("test", _photos(n), labels)
    pre = Preprocessing(96, 110)
    info = write_errors(tmp_path, "report", logits, labels, split, classes, pre, title="test on photos")
    rows = _rows(tmp_path / "errors.csv")
    wrong = int((logits.argmax(1) != labels).sum())
    assert info["errors"] == len(rows) == wrong
    assert set(rows[0]) == {"index", "true", "predicted", "prob_true", "prob_predicted", "loss"}
    for r in rows:
        i = int(r["index"])
        assert classes[int(labels[i])] == r["true"]
        assert float(r["loss"]) == pytest.approx(-torch.log_softmax(logits[i].double(), 0)[labels[i]].item(),
                                                 rel=1e-5)
    assert info["tiles"] == min(25, wrong)
    with Image.open(tmp_path / "top_losses.png") as im:
        assert im.text["tiles"] == str(min(25, wrong))


def test_sheet_of_fewer_errors_than_25(tmp_path):
    rows = [{"true": "cat", "predicted": "dog", "prob_true": 0.1, "prob_predicted": 0.9}] * 3
    assert top_losses_png(tmp_path / "s.png", torch.rand(3, 3, 32, 32), rows) == 3
    with Image.open(tmp_path / "s.png") as im:
        assert im.text["grid"] == "1x3"


def test_predict_csv_round_trips_with_json(fp32_run, cifar_small, tmp_path):
    out = fp32_run
    folder = cifar_small / "test" / "cat"
    table = tmp_path / "pred.csv"
    proc = run_cli("predict", out, folder, "--topk", "3", "--json", "--csv", table, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    predictions = json.loads(proc.stdout)["predictions"]
    rows = _rows(table)
    assert list(rows[0]) == ["file", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    assert len(rows) == len(predictions) == len(list(folder.iterdir()))
    for r, p in zip(rows, predictions):
        assert r["file"] == p["file"]
        for i, top in enumerate(p["top"], 1):
            assert r[f"class_{i}"] == top["class"]
            assert float(r[f"prob_{i}"]) == pytest.approx(top["prob"], rel=1e-5)
    assert not list(tmp_path.glob(".pred.csv.*"))  # no temporary file left


@pytest.mark.parametrize("where, why", [("missing/pred.csv", "does not exist"), (".", "is a folder")])
def test_predict_bad_csv_path_exits_2_before_any_work(where, why, tmp_path):
    # No run folder at all: the --csv check comes first, so its message is what the user sees.
    proc = run_cli("predict", tmp_path / "no-run", tmp_path, "--csv", tmp_path / where)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --csv") and why in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("*.tmp"))


def test_eval_of_the_carved_val_split_lists_its_files(fp32_run, tmp_path):
    """Val carved from train keeps each image's file through the carving: the rows name train/ files."""
    out = fp32_run
    proc = run_cli("eval", out, "--split", "val", "--device", "cpu", "--report-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    stem = next(tmp_path.glob("eval-*.md")).stem
    rows = _rows(tmp_path / f"{stem}_errors.csv")
    confusion = json.loads((tmp_path / f"{stem}.json").read_text())["confusion"]
    assert len(rows) == sum(n for i, row in enumerate(confusion) for j, n in enumerate(row) if i != j) > 0
    assert all(Path(r["file"]).parent.parent.name == "train" and Path(r["file"]).parent.name == r["true"]
               for r in rows)


def test_a_streamed_split_reads_only_the_sheets_files(cifar_small, tmp_path, monkeypatch):
    """Streamed from its files, the split decodes just the images on the sheet to draw it."""
    from transferkit.data import folders, preprocess

    files = sorted((cifar_small / "test").rglob("*.jpg"))[:60]
    classes = sorted({f.parent.name for f in files})
    labels = torch.tensor([classes.index(f.parent.name) for f in files])
    pre = Preprocessing(64, 73)
    split = Split("test", folders.FileImages(files, pre, 64), labels, [str(f) for f in files])
    read = []
    real = preprocess.read_image
    monkeypatch.setattr(preprocess, "read_image", lambda p, *a: read.append(p) or real(p, *a))
    torch.manual_seed(1)
    logits = torch.randn(len(files), len(classes)) * 4
    info = write_errors(tmp_path, "report", logits, labels, split, classes, pre)
    rows = _rows(tmp_path / "errors.csv")
    assert info["tiles"] == len(read) == min(25, len(rows))
    assert [str(p) for p in read] == [r["file"] for r in rows[:25]]


def test_predict_csv_of_no_readable_image_leaves_no_file(fp32_run, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not an image")
    table = tmp_path / "pred.csv"
    proc = run_cli("predict", fp32_run, tmp_path / "in", "--csv", table, "--device", "cpu")
    assert proc.returncode == 2 and "no image could be read" in proc.stderr
    assert not table.exists() and not list(tmp_path.glob(".pred.csv.*"))
