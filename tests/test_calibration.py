"""Calibration: ECE against a brute-force reference, temperature scaling on a real overconfident run, and
calibrated probabilities from predict and eval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import needs_weights, run_cli
from transferkit.checkpoint import read_card
from transferkit.data.images import read_image
from transferkit.errors import TransferkitError
from transferkit.predict import Predictor
from transferkit.report.calibration import expected_calibration_error, fit_temperature, nll, reliability_bins
from transferkit.training.engine import infer


def _reference_ece(probs: list[list[float]], labels: list[int], bins: int = 15) -> float:
    """ECE the slow way: for each bin (lo, hi], loop over every sample."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        conf_sum, correct, n = 0.0, 0, 0
        for p, y in zip(probs, labels):
            conf = max(p)
            pred = p.index(conf)
            if lo < conf <= hi or (b == 0 and conf == 0.0):
                conf_sum += conf
                correct += pred == y
                n += 1
        if n:
            total += n / len(labels) * abs(correct / n - conf_sum / n)
    return total


@pytest.mark.parametrize("seed", range(6))
def test_ece_matches_a_brute_force_reference_on_random_logits(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = [(1, 2), (7, 3), (200, 10), (500, 2), (64, 100), (300, 5)][seed]
    probs = (torch.randn(n, k, generator=g, dtype=torch.float64) * (seed + 1)).softmax(1)
    labels = torch.randint(0, k, (n,), generator=g)
    assert expected_calibration_error(probs, labels) == pytest.approx(
        _reference_ece(probs.tolist(), labels.tolist()), abs=1e-12)


def test_ece_on_bin_edges_and_extremes_matches_the_reference():
    """Confidences exactly on a bin edge (k/15) belong to the bin below; 1.0 to the last; 1/2 with two classes."""
    rows, labels = [], []
    for i in range(1, 16):  # top-1 confidence exactly i/15 (i >= 8 so it is the top one with two classes)
        c = max(i, 8) / 15
        rows.append([c, 1 - c])
        labels.append(i % 2)
    rows += [[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]
    labels += [0, 0, 0]
    probs = torch.tensor(rows, dtype=torch.float64)
    got = expected_calibration_error(probs, torch.tensor(labels))
    assert got == pytest.approx(_reference_ece(rows, labels), abs=1e-12)
    bins = reliability_bins(probs, torch.tensor(labels))
    assert sum(b["images"] for b in bins) == len(rows)
    assert bins[14]["images"] == 3  # 15/15 twice and [0, 1]: 1.0 is in the last bin
    assert bins[7]["images"] == 9  # eight rows at 8/15, the upper edge of bin 7, and [0.5, 0.5]
    perfect = torch.eye(4, dtype=torch.float64)
    assert expected_calibration_error(perfect, torch.arange(4)) == 0.0
    assert expected_calibration_error(perfect, torch.tensor([1, 2, 3, 0])) == 1.0


def test_fitted_temperature_recovers_a_known_overconfidence_and_keeps_the_argmax():
    """Labels drawn from softmax(z); the model says 3z: the NLL is lowest near T = 3, and no prediction changes."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 6, generator=g, dtype=torch.float64) * 1.5
    labels = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    logits = 3 * z
    t = fit_temperature(logits, labels)
    assert 2.6 < t < 3.4
    assert nll(logits, labels, t) < nll(logits, labels) - 0.1
    assert torch.equal((logits / t).argmax(1), logits.argmax(1))
    assert fit_temperature(logits, labels) == t  # deterministic
    assert fit_temperature(torch.zeros(5, 3), torch.tensor([0, 1, 2, 0, 1])) == 1.0  # a flat NLL keeps T = 1


@pytest.mark.parametrize(("logits", "labels", "message"), [
    (torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]), "NaN or infinite"),
    (torch.zeros(3, 2), torch.tensor([0, 1]), "logits \\(N, K\\) and labels \\(N,\\)"),
    (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), "at least one image"),
    (torch.zeros(2, 2), torch.tensor([0, 2]), "labels must lie in 0..1"),
])
def test_bad_input_to_calibration_is_refused_with_a_sentence(logits, labels, message):
    with pytest.raises(TransferkitError, match=message):
        fit_temperature(logits, labels)


@pytest.fixture(scope="module")
def calibrated_run(cifar_small, tmp_path_factory) -> Path:
    """A linear probe at a high learning rate and no label smoothing: overconfident, then --calibrate."""
    out = tmp_path_factory.mktemp("calib") / "hot"
    proc = run_cli("train", "--data", cifar_small, "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1",
                   "--strategy", "linear", "--epochs", "5", "--lr", "0.02", "--label-smoothing", "0",
                   "--weight-decay", "0", "--image-size", "64", "--batch-size", "32", "--val-split", "0.25",
                   "--workers", "1", "--calibrate", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@needs_weights
def test_calibrate_lowers_the_validation_nll_of_an_overconfident_run_and_keeps_its_accuracy(calibrated_run):
    card = json.loads((calibrated_run / "model.json").read_text())
    assert card["temperature"] > 1.2  # overconfident: the fitted temperature softens it
    proc = run_cli("eval", calibrated_run, "--split", "val", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    val = json.loads(proc.stdout)
    cal = val["calibration"] if "calibration" in val else val["metrics"]["calibration"]
    assert cal["temperature"] == card["temperature"]
    assert cal["nll"] < cal["nll_uncalibrated"] - 0.05 and cal["ece"] < cal["ece_uncalibrated"]
    # The train report shows the test split's figures before and after, and the same accuracy as eval of test.
    report = json.loads((calibrated_run / "report.json").read_text())
    assert report["calibration"]["temperature"] == card["temperature"]
    md = (calibrated_run / "report.md").read_text()
    assert "## Calibration" in md and "before (temperature 1)" in md and f"{card['temperature']:.4g}" in md
    assert (calibrated_run / "report_reliability.png").stat().st_size > 5000
    proc = run_cli("eval", calibrated_run, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    test = json.loads(proc.stdout)
    assert (test.get("metrics") or test)["accuracy"] == report["accuracy"]


@needs_weights
def test_predict_on_a_calibrated_run_returns_softmax_of_the_logits_over_its_temperature(calibrated_run, cifar_small):
    t = json.loads((calibrated_run / "model.json").read_text())["temperature"]
    files = sorted((cifar_small / "test").glob("*/*"))[::25]
    pred = Predictor.from_run(calibrated_run, device="cpu")
    assert pred.temperature == t
    got = pred.predict(files, topk=10)
    x = torch.cat([pred.preprocessing.to_input(pred.preprocessing.store(read_image(f))[None]) for f in files])
    with torch.no_grad():
        logits = infer(pred.model, x, device=pred.device, precision=pred.precision)
    for row, want, raw in zip(got, (logits / t).softmax(1), logits.softmax(1)):
        probs = torch.tensor([p for _, p in sorted(row, key=lambda cp: pred.classes.index(cp[0]))])
        assert torch.allclose(probs, want.float(), atol=1e-5)
        assert row[0][0] == pred.classes[int(raw.argmax())]  # the top class is the uncalibrated one
    assert not torch.allclose((logits / t).softmax(1), logits.softmax(1), atol=1e-3)
    proc = run_cli("predict", calibrated_run, files[0], "--json", "--topk", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["predictions"][0]["top"][0]["prob"] == pytest.approx(got[0][0][1], abs=1e-5)


@needs_weights
def test_a_model_json_without_a_temperature_loads_as_uncalibrated_and_a_bad_one_is_refused(calibrated_run, tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    for f in ("model.safetensors", "model.json"):
        (run / f).write_bytes((calibrated_run / f).read_bytes())
    card = json.loads((run / "model.json").read_text())
    del card["temperature"]
    (run / "model.json").write_text(json.dumps(card))
    assert read_card(run).temperature == 1.0 and Predictor.from_run(run, device="cpu").temperature == 1.0
    for bad in (-1, 0, "hot", None, math.inf):
        (run / "model.json").write_text(json.dumps(dict(card, temperature=bad)))
        proc = run_cli("predict", run, tmp_path)
        assert proc.returncode == 2 and "damaged" in proc.stderr and "temperature" in proc.stderr, proc.stderr


def test_calibrate_without_a_validation_split_exits_2_before_training(cifar_small, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--data", cifar_small, "--model", "resnet18", "--weights", "none", "--val-split", "0",
                   "--calibrate", "--image-size", "32", "--epochs", "1", "--out", out)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--calibrate" in proc.stderr and "--val-split 0.1" in proc.stderr and "Traceback" not in proc.stderr
    assert "epoch 1/1" not in proc.stderr and not out.exists()


# issue 27, item 9: a validation split too small to fit a temperature on --------------------------------------------

def test_a_temperature_at_the_end_of_the_search_is_not_stored_and_the_report_says_why(tmp_path, caplog):
    """A model right on every validation image with margin: the NLL falls all the way to T = 0.01, the search's
    end. That is no fit: T = 1 is kept, and the log and the report say why."""
    from transferkit.report import classification_metrics, write_report
    from transferkit.report.calibration import summary

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(20)
    logits = torch.randn(60, 3, generator=g) + 4 * torch.nn.functional.one_hot(labels, 3)
    assert torch.equal(logits.argmax(1), labels)
    with caplog.at_level("WARNING", logger="transferkit"):
        t = fit_temperature(logits, labels)
    assert t == 1.0  # not 0.01
    assert "end of the search" in caplog.text and "kept temperature 1" in caplog.text
    metrics = classification_metrics(logits, labels, ["a", "b", "c"])
    metrics["calibration"] = summary(logits, labels, t)
    md = write_report(tmp_path, metrics, title="t", measured_on="val", classes=["a", "b", "c"], setup={})
    text = md.read_text()
    assert "not calibrated" in text and "every validation image right" in text
    assert "every validation image right" in (tmp_path / "report.html").read_text()


def test_calibrate_with_a_validation_split_of_a_few_images_exits_2_before_training(tmp_path):
    from conftest import SHARED_CIFAR, link_subset

    if not (SHARED_CIFAR / "train").is_dir():
        pytest.skip(f"shared CIFAR-10 folder not found at {SHARED_CIFAR}")
    data = tmp_path / "data"
    link_subset(SHARED_CIFAR / "train", data / "train", 20, ["cat", "dog"])
    link_subset(SHARED_CIFAR / "test", data / "val", 1, ["cat", "dog"])  # two validation images
    out = tmp_path / "run"
    proc = run_cli("train", "--data", data, "--model", "resnet18", "--weights", "none", "--calibrate",
                   "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--out", out)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "2 image(s)" in proc.stderr and "at least 30" in proc.stderr and "Traceback" not in proc.stderr
    assert "epoch 1/1" not in proc.stderr and not (out / "model.json").exists()
