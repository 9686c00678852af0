"""The parity check: the exported file against PyTorch fp32 on real images, kept only if they agree.

An fp32 export must give the same top-1 class on every check image, with softmax probabilities
within MAX_PROB_DIFF; one that disagrees is refused (CheckFailed) and nothing is written.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import CheckFailed
from .request import Target

log = logging.getLogger(__name__)

MAX_PROB_DIFF = 1e-4  # largest |softmax(PyTorch) - softmax(exported)| an fp32 export may show


def parity(reference: torch.Tensor, exported: torch.Tensor) -> dict[str, Any]:
    """Top-1 agreement and the largest absolute difference of the softmax probabilities."""
    p, q = reference.softmax(1), exported.softmax(1)
    return {"images": len(reference),
            "top1_agreement": float((p.argmax(1) == q.argmax(1)).float().mean()),
            "max_abs_prob_diff": float((p - q).abs().max()),
            "max_abs_logit_diff": float((reference - exported).abs().max())}


def check_parity(reference: torch.Tensor, exported: torch.Tensor, target: Target,
                 measured_on: str) -> dict[str, Any]:
    """The parity figures export.json records; an export that disagrees is refused (CheckFailed)."""
    figures = parity(reference, exported)
    passed = figures["top1_agreement"] == 1.0 and figures["max_abs_prob_diff"] <= MAX_PROB_DIFF
    log.debug("parity %s vs PyTorch on %d images: top-1 agreement %.2f%%, max |softmax difference| "
             "%.2e", target.fmt, figures["images"], 100 * figures["top1_agreement"],
             figures["max_abs_prob_diff"])
    if not passed:
        other = ("Try --format onnx" if target.fmt == "torchscript"
                 else "Try --format torchscript or another --opset")
        raise CheckFailed(
            f"the {target.fmt} export disagrees with PyTorch on "
            f"{measured_on or 'the check images'}: top-1 agreement "
            f"{100 * figures['top1_agreement']:.2f}% (needs 100%), max |softmax difference| "
            f"{figures['max_abs_prob_diff']:.2e} (limit {MAX_PROB_DIFF:.0e}); nothing was written "
            f"to {target.path}. " + other)
    return {**figures, "measured_on": measured_on, "against": "PyTorch fp32 on the CPU",
            "limits": {"top1_agreement": 1.0, "max_abs_prob_diff": MAX_PROB_DIFF},
            "passed": passed}
