"""Can the probabilities be trusted:
expected calibration error, temperature scaling, the reliability diagram."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from ..errors import TransferkitError
from .escape import md_picture, md_text
from .plots import reliability_png

log = logging.getLogger(__name__)

BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al. 2017 use 15)
# the temperatures searched: beyond these the model is broken
LOG_T_RANGE = (math.log(0.01), math.log(100.0))
# golden-section steps: the bracket shrinks to 0.618^80 of its width, far below float noise
SEARCH_STEPS = 80
# a minimum this close to an end of LOG_T_RANGE (in log T) is the end: the NLL still falls there
AT_BOUND = 0.05
# --calibrate refuses a smaller validation split: below it one image moves the NLL by over 3%,
# and a split the model gets all right (or all wrong) has no finite best temperature
MIN_IMAGES = 30


class Temperature(float):
    """A fitted temperature; `note` says why it is 1 where the fit was not kept (else empty)."""

    note: str

    def __new__(cls, value: float, note: str = "") -> Temperature:
        t = super().__new__(cls, value)
        t.note = note
        return t


def _checked(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 logits (N, K) and int64 labels (N,), or a clear error."""
    if logits.ndim != 2 or labels.ndim != 1 or len(logits) != len(labels):
        raise TransferkitError(f"calibration needs logits (N, K) and labels (N,), got "
                               f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if len(labels) == 0:
        raise TransferkitError("calibration needs at least one image; the split is empty")
    if not torch.isfinite(logits).all():
        raise TransferkitError("the logits hold NaN or infinite values: the model diverged; "
                               "retrain with a lower --lr")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise TransferkitError(f"labels must lie in 0..{logits.shape[1] - 1} "
                               f"for {logits.shape[1]} classes")
    return logits.double(), labels


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor,
                     bins: int = BINS) -> list[dict[str, Any]]:
    """Per equal-width bin of top-1 confidence, (lo, hi]:
    images, their accuracy and mean confidence."""
    if bins < 1:
        raise TransferkitError(f"bins {bins}: use at least one bin")
    conf, pred = probs.double().max(1)
    # Edges as i/bins exactly (not linspace),
    # so a confidence on an edge goes where (lo, hi] says it goes.
    edges = torch.tensor([i / bins for i in range(bins + 1)], dtype=torch.float64)
    # edges[i] < conf <= edges[i + 1]
    index = torch.bucketize(conf, edges[1:], right=False).clamp(max=bins - 1)
    correct = (pred == labels).double()
    rows = []
    for i in range(bins):
        inside = index == i
        n = int(inside.sum())
        rows.append({"lo": edges[i].item(), "hi": edges[i + 1].item(), "images": n,
                     "accuracy": correct[inside].mean().item() if n else None,
                     "confidence": conf[inside].mean().item() if n else None})
    return rows


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor,
                               bins: int = BINS) -> float:
    """ECE: the images-weighted mean gap between accuracy
    and mean top-1 confidence over equal-width bins."""
    if probs.ndim != 2 or len(probs) != len(labels) or len(labels) == 0:
        raise TransferkitError(f"ECE needs probabilities (N, K) and labels (N,) with N > 0, got "
                               f"{tuple(probs.shape)} and {tuple(labels.shape)}")
    rows = reliability_bins(probs, labels.long(), bins)
    return sum(r["images"] * abs(r["accuracy"] - r["confidence"])
               for r in rows if r["images"]) / len(labels)


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    logits, labels = _checked(logits, labels)
    return torch.nn.functional.cross_entropy(logits / temperature, labels).item()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> Temperature:
    """The one temperature T that minimizes the NLL of softmax(logits / T):
    a golden-section search on log T.

    The NLL is convex in 1/T, so unimodal in log T: the bounded search finds its minimum,
    the same one on every machine (no random start, no learning rate). A minimum at an end of
    the search is no fit (the NLL still falls beyond it): T = 1 is kept, and its `note` and a
    warning say why.
    """
    logits, labels = _checked(logits, labels)

    def loss(log_t: float) -> float:
        return torch.nn.functional.cross_entropy(logits / math.exp(log_t), labels).item()

    lo, hi = LOG_T_RANGE
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(SEARCH_STEPS):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    best = (lo + hi) / 2
    # no better than as trained (e.g. a flat NLL, every logit equal): keep T = 1
    if loss(best) >= loss(0.0):
        return Temperature(1.0)
    edge = next((e for e in LOG_T_RANGE if abs(best - e) < AT_BOUND), None)
    if edge is None:
        return Temperature(math.exp(best))
    note = (f"not calibrated: the validation NLL still falls at temperature "
            f"{math.exp(edge):g}, the end of the search, " + (
                "as it does when the model gets every validation image right"
                if edge < 0 else "as it does when the probabilities carry no information there")
            + f" ({len(labels):,} images); kept temperature 1")
    log.warning("--calibrate: %s", note)
    return Temperature(1.0, note)


def check_calibration_split(calibrate: bool, val: Any, data: str) -> None:
    """--calibrate fits on the validation split: refuse, before training, a run that has none
    or fewer than MIN_IMAGES images there."""
    if calibrate and val is None:
        raise TransferkitError(f"--calibrate fits its temperature on the validation split, and "
                               f"{data} has none; hold some training images out with "
                               "--val-split 0.1 (or add a val/ folder), or drop --calibrate")
    if calibrate and len(val) < MIN_IMAGES:
        raise TransferkitError(f"--calibrate fits its temperature on the validation split, which "
                               f"has {len(val):,} image(s) here; it needs at least {MIN_IMAGES}: "
                               "hold more images out (a larger --val-split, or more in val/), or "
                               "drop --calibrate")


def summary(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> dict[str, Any]:
    """The report's calibration figures:
    ECE and NLL with the model's temperature and without, and its bins."""
    logits, labels = _checked(logits, labels)
    raw, scaled = logits.softmax(1), (logits / temperature).softmax(1)
    note = getattr(temperature, "note", "")
    return {"temperature": float(temperature), **({"note": note} if note else {}), "bins": BINS,
            "ece": expected_calibration_error(scaled, labels),
            "nll": nll(logits, labels, temperature),
            "ece_uncalibrated": expected_calibration_error(raw, labels),
            "nll_uncalibrated": nll(logits, labels),
            "reliability": reliability_bins(scaled, labels)}


def uncalibrated_label(figures: dict[str, Any]) -> str:
    """The row of a report's calibration table where the temperature is 1."""
    return ("not calibrated (--calibrate's fit was not kept: see below)" if figures.get("note")
            else "uncalibrated (--calibrate fits a temperature)")


def report_section(out_dir: Path, metrics: dict[str, Any], name: str) -> list[str]:
    """report.md's calibration lines (and <name>_reliability.png);
    none when the metrics hold no figures."""
    figures = metrics.get("calibration")
    if not figures:
        return []
    png = f"{name}_reliability.png"
    reliability_png(Path(out_dir) / png, figures, "Reliability diagram")
    t = figures["temperature"]
    lines = ["## Calibration", "",
             f"Expected calibration error over {figures['bins']} equal-width bins of top-1 "
             "confidence, and the negative log-likelihood (lower is better for both).", "",
             "| | ECE | NLL |", "| --- | --- | --- |"]
    if t != 1.0:
        lines += [f"| before (temperature 1) | {100 * figures['ece_uncalibrated']:.2f}% | "
                  f"{figures['nll_uncalibrated']:.4f} |",
                  f"| after (temperature {t:.4g}, fitted on the validation split) | "
                  f"{100 * figures['ece']:.2f}% | {figures['nll']:.4f} |"]
    else:
        lines += [f"| {uncalibrated_label(figures)} | "
                  f"{100 * figures['ece']:.2f}% | {figures['nll']:.4f} |"]
    note = [f"--calibrate: {md_text(figures['note'])}.", ""] if figures.get("note") else []
    return lines + ["", *note, md_picture("reliability diagram", png), ""]
