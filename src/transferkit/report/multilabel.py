"""Multi-label metrics: mAP, micro/macro F1, exact match, per-label tables and the per-label
decision thresholds chosen on the validation split.

Average precision is scikit-learn's `average_precision_score`: the step-wise sum over the distinct
scores of (R_n - R_(n-1)) * P_n, no interpolation; images with equal scores enter together. It ranks
by the logits, which order the images as the sigmoid does without the sigmoid's float ties at the
extremes. A label is predicted when its sigmoid probability is >= its threshold."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import TransferkitError, shown

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5  # on the sigmoid probability; also the threshold of a label never seen
NAMED = 5  # a log line names at most this many labels


def _checked(logits: torch.Tensor, targets: torch.Tensor, classes: list[str] | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits as float64, targets as bool), or a TransferkitError that says what to fix."""
    if logits.dim() != 2 or targets.shape != logits.shape:
        raise TransferkitError(
            f"multi-label scores and targets must both be (images, labels); got scores of shape "
            f"{tuple(logits.shape)} and targets of shape {tuple(targets.shape)}.")
    n, k = logits.shape
    if classes is not None and len(classes) != k:
        raise TransferkitError(
            f"the scores have {k} labels but {len(classes)} label names were given "
            f"({shown(list(classes))}); pass one name per column.")
    if n == 0 or k == 0:
        raise TransferkitError(f"no {'images' if n == 0 else 'labels'} to measure: multi-label "
                               "metrics need at least one image with at least one label column.")
    scores = logits.detach().double().cpu()
    if scores.isnan().any():
        i, j = (int(v) for v in scores.isnan().nonzero()[0])
        raise TransferkitError(f"the score of image {i}, label {_name(classes, j)} is NaN: the "
                               "model diverged; lower the learning rate and train again.")
    t = targets.detach().cpu()
    bad = (t != 0) & (t != 1)
    if bad.any():
        i, j = (int(v) for v in bad.nonzero()[0])
        raise TransferkitError(
            f"multi-label targets must be 0 or 1; image {i}, label {_name(classes, j)} holds "
            f"{t[i, j].item()!r} ({int(bad.sum())} such values): give each label 0 or 1.")
    return scores, t.bool()


def _name(classes: list[str] | None, j: int) -> str:
    return f"{j}" if classes is None else f"{j} ({shown(classes[j])})"


def _ranked(scores: torch.Tensor, positive: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At each distinct score, highest first: (the score, true positives, false positives) among
    the images scoring at least that much, so tied images always enter together."""
    order = torch.argsort(scores, descending=True, stable=True)
    s, p = scores[order], positive[order].double()
    last = torch.ones(len(s), dtype=torch.bool)  # the last image of each run of equal scores
    last[:-1] = s[1:] != s[:-1]
    return s[last], p.cumsum(0)[last], (1 - p).cumsum(0)[last]


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Average precision of one label's scores (N,) against 0/1 targets (N,), as scikit-learn
    defines it; None when the label has no positive image (it has no recall to step through)."""
    n_pos = int(positive.sum())
    if n_pos == 0:
        return None
    _, tp, fp = _ranked(scores.double(), positive.bool())
    precision, recall = tp / (tp + fp), tp / n_pos
    return float((torch.diff(recall, prepend=recall.new_zeros(1)) * precision).sum())


def _thresholds_checked(thresholds: list[float] | None, k: int) -> torch.Tensor:
    if thresholds is None:
        return torch.full((k,), DEFAULT_THRESHOLD, dtype=torch.float64)
    t = torch.as_tensor(list(thresholds), dtype=torch.float64)
    if t.shape != (k,) or not ((t >= 0) & (t <= 1)).all():
        raise TransferkitError(
            f"multi-label thresholds must be {k} probabilities between 0 and 1, one per label; "
            f"got {shown(list(thresholds))}.")
    return t


def predicted(logits: torch.Tensor, thresholds: list[float] | None = None) -> torch.Tensor:
    """The labels each image is given, (images, labels) bool: those whose sigmoid probability is
    at least their threshold (0.5 each without thresholds)."""
    scores = logits.detach().double().cpu()
    return torch.sigmoid(scores) >= _thresholds_checked(thresholds, scores.shape[1])


def multilabel_metrics(logits: torch.Tensor, targets: torch.Tensor, classes: list[str],
                       thresholds: list[float] | None = None) -> dict[str, Any]:
    """mAP (macro mean of per-label AP over the labels with a positive image; None when none has
    one), micro- and macro-F1 (macro over the same labels), exact-match ratio and per-label
    AP/precision/recall/F1/support and false positive/negative counts, labels predicted at
    `thresholds` (default 0.5 each)."""
    scores, truth = _checked(logits, targets, classes)
    cut = _thresholds_checked(thresholds, len(classes))
    pred = predicted(scores, thresholds)
    tp = (pred & truth).sum(0).double()
    fp = (pred & ~truth).sum(0).double()
    fn = (~pred & truth).sum(0)
    support = truth.sum(0)
    precision = tp / (tp + fp).clamp(min=1)
    recall = tp / support.double().clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    present = support > 0  # a label with no positive image has no AP or recall to average
    ap = [average_precision(scores[:, j], truth[:, j]) for j in range(len(classes))]
    fn_total = support.sum().double() - tp.sum()
    micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn_total).clamp(min=1)
    return {
        "images": len(truth),
        "map": (sum(a for a in ap if a is not None) / int(present.sum())
                if present.any() else None),
        "labels_without_positives": int((~present).sum()),
        "micro_f1": micro.item(),
        "macro_f1": f1[present].mean().item() if present.any() else None,
        "exact_match": (pred == truth).all(1).double().mean().item(),
        "per_label": [
            {"label": c, "ap": ap[j], "precision": precision[j].item(), "recall": recall[j].item(),
             "f1": f1[j].item(), "support": int(support[j]), "threshold": cut[j].item(),
             "false_positives": int(fp[j]), "false_negatives": int(fn[j])}
            for j, c in enumerate(classes)
        ],
    }


def _best_threshold(probs: torch.Tensor, positive: torch.Tensor) -> float:
    """The probability cut (predict when >= it) with the highest F1; of equal F1s the lowest. It
    lies halfway to the next lower score: no validation image sits on its threshold, where float
    noise (cached features or the whole model, ONNX or PyTorch) would flip its answer."""
    cuts, tp, fp = _ranked(probs, positive)
    f1 = 2 * tp / (tp + fp + int(positive.sum()))  # 2TP / (2TP + FP + FN): counts, exact ties
    best = int((f1 == f1.max()).nonzero()[-1])  # cuts fall, so the last of the best is the lowest
    below = cuts[best + 1].item() if best + 1 < len(cuts) else 0.0
    return (cuts[best].item() + below) / 2


def choose_thresholds(logits: torch.Tensor, targets: torch.Tensor,
                      classes: list[str] | None = None, *, say: bool = True) -> list[float]:
    """Per-label thresholds on the sigmoid probability that maximise each label's F1 on these
    (validation) images; 0.5 for a label with no positive image here (with a log line when
    `say`)."""
    scores, truth = _checked(logits, targets, classes)
    probs = torch.sigmoid(scores)  # float64: distinct up to |logit| ~ 36
    out, unseen = [], []
    for j in range(scores.shape[1]):
        if truth[:, j].any():
            out.append(_best_threshold(probs[:, j], truth[:, j]))
        else:
            out.append(DEFAULT_THRESHOLD)
            unseen.append(classes[j] if classes is not None else str(j))
    if unseen and say:
        more = f" and {len(unseen) - NAMED} more" if len(unseen) > NAMED else ""
        log.warning("%d label(s) have no positive image in the validation split, so their "
                    "threshold stays %g: %s%s", len(unseen), DEFAULT_THRESHOLD,
                    ", ".join(unseen[:NAMED]), more)
    return out


def figures_line(metrics: dict[str, Any]) -> str:
    """'mAP 81.20%, micro-F1 75.00%, macro-F1 70.10%, exact match 40.00%' as the CLI prints it."""
    return ", ".join(f"{name} " + ("n/a" if metrics.get(key) is None else
                                    f"{100 * metrics[key]:.2f}%")
                     for name, key in (("mAP", "map"), ("micro-F1", "micro_f1"),
                                       ("macro-F1", "macro_f1"), ("exact match", "exact_match")))


# the figures of a multi-label run's epoch rows that a report shows: (column, key); a multi-label
# row's train_acc is its exact-match ratio at 0.5 (task.Task.correct), so is val_exact_match
EPOCH_COLUMNS = (("train exact match", "train_acc"), ("val mAP", "val_map"),
                 ("val exact match", "val_exact_match"))
MISTAKES_SHOWN = 10  # the most frequent false-positive (and false-negative) labels a report lists


def thresholds_note(metrics: dict[str, Any]) -> str:
    """How the decision thresholds of these metrics were chosen, as one sentence
    (metrics["thresholds_chosen_on"]: "validation", None for no validation split, absent when
    the thresholds came with the model)."""
    on = metrics.get("thresholds_chosen_on", "model")
    if on == "validation":
        return ("Each label's decision threshold (on its sigmoid probability) was chosen on the "
                "validation split to maximise its F1; model.json records them.")
    if on is None:
        return (f"No validation split to choose them on: every label's decision threshold is "
                f"{DEFAULT_THRESHOLD:g}.")
    if all(r["threshold"] == DEFAULT_THRESHOLD for r in metrics["per_label"]):
        return f"Every label's decision threshold is {DEFAULT_THRESHOLD:g}."
    return "Each label's decision threshold is the model's (model.json), as the table gives."


def frequent_mistakes(metrics: dict[str, Any], n: int = MISTAKES_SHOWN
                      ) -> tuple[list[tuple[str, int, float]], list[tuple[str, int, float]]]:
    """The `n` labels most often given wrongly, (label, images, share of the images without
    it), and the `n` most often missed, (label, images, share of its images); most first, ties
    in label order."""
    rows, images = metrics["per_label"], metrics["images"]

    def most(key: str, out_of) -> list[tuple[str, int, float]]:
        ranked = sorted((r for r in rows if r[key] > 0), key=lambda r: -r[key])[:n]
        return [(r["label"], r[key], r[key] / max(1, out_of(r))) for r in ranked]

    return (most("false_positives", lambda r: images - r["support"]),
            most("false_negatives", lambda r: r["support"]))
