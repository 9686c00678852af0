"""The parity check: the exported file against PyTorch fp32 on real images, kept only if they agree.

An fp32 export must give the same top-1 class on every check image, with softmax probabilities
within MAX_PROB_DIFF; a multi-label model's must answer the same set of labels on every image
(each label's sigmoid against its threshold), with sigmoid probabilities within MAX_PROB_DIFF. One
that disagrees is refused (CheckFailed) and nothing is written.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import CheckFailed
from ..task import ONE_CLASS, Task
from .request import Target

log = logging.getLogger(__name__)

MAX_PROB_DIFF = 1e-4  # largest |PyTorch - exported| softmax (or sigmoid) an fp32 export may show


def parity(reference: torch.Tensor, exported: torch.Tensor, task: Task = ONE_CLASS,
           thresholds: list[float] | None = None) -> dict[str, Any]:
    """Top-1 agreement and the largest absolute difference of the softmax probabilities; for a
    multi-label model, the share of images answered the same set of labels at `thresholds` (None:
    0.5 each) and the largest difference of the sigmoids (with the label decisions that differ
    only where PyTorch scores an image at its threshold, within that difference)."""
    p, q = task.probabilities(reference), task.probabilities(exported)
    diff = float((p - q).abs().max())
    figures: dict[str, Any] = {"images": len(reference)}
    if not task.multilabel:
        figures["top1_agreement"] = float((p.argmax(1) == q.argmax(1)).float().mean())
    else:
        from ..report.multilabel import DEFAULT_THRESHOLD

        differ = task.answered(p, thresholds) != task.answered(q, thresholds)
        cut = torch.tensor(thresholds or [DEFAULT_THRESHOLD] * p.shape[1], dtype=torch.float64)
        at_threshold = (p.double() - cut).abs() <= diff
        figures.update(task="multilabel",
                       label_set_agreement=float((~differ).all(1).float().mean()),
                       decisions_differing=int(differ.sum()),
                       decisions_at_threshold=int((differ & at_threshold).sum()))
    return {**figures, "max_abs_prob_diff": diff,
            "max_abs_logit_diff": float((reference - exported).abs().max())}


def agreement(figures: dict[str, Any]) -> tuple[str, float]:
    """(what agrees, its share) of parity's figures: top-1, or a multi-label model's label sets."""
    if "label_set_agreement" in figures:
        return "label-set agreement", figures["label_set_agreement"]
    return "top-1 agreement", figures["top1_agreement"]


def passes(figures: dict[str, Any]) -> bool:
    """Every image answered alike (a multi-label decision may differ only where PyTorch scores
    the image at the label's threshold, within the probability difference), probabilities within
    MAX_PROB_DIFF."""
    if figures["max_abs_prob_diff"] > MAX_PROB_DIFF:
        return False
    if "label_set_agreement" in figures:
        return figures["decisions_differing"] == figures["decisions_at_threshold"]
    return figures["top1_agreement"] == 1.0


def check_parity(reference: torch.Tensor, exported: torch.Tensor, target: Target,
                 measured_on: str, task: Task = ONE_CLASS,
                 thresholds: list[float] | None = None) -> dict[str, Any]:
    """The parity figures export.json records; an export that disagrees is refused (CheckFailed)."""
    figures = parity(reference, exported, task, thresholds)
    passed = passes(figures)
    what, share = agreement(figures)
    prob = "sigmoid" if task.multilabel else "softmax"
    log.debug("parity %s vs PyTorch on %d images: %s %.2f%%, max |%s difference| %.2e",
              target.fmt, figures["images"], what, 100 * share, prob, figures["max_abs_prob_diff"])
    if not passed:
        other = ("Try --format onnx" if target.fmt == "torchscript"
                 else "Try --format torchscript or another --opset")
        raise CheckFailed(
            f"the {target.fmt} export disagrees with PyTorch on "
            f"{measured_on or 'the check images'}: {what} {100 * share:.2f}% (needs 100%), max "
            f"|{prob} difference| {figures['max_abs_prob_diff']:.2e} (limit "
            f"{MAX_PROB_DIFF:.0e}); nothing was written to {target.path}. " + other)
    limits = {"label_set_agreement" if task.multilabel else "top1_agreement": 1.0,
              "max_abs_prob_diff": MAX_PROB_DIFF}
    return {**figures, "measured_on": measured_on, "against": "PyTorch fp32 on the CPU",
            "limits": limits, "passed": passed}
