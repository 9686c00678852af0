"""int8 quantization by onnxruntime, kept only when its accuracy drop on labelled images is small.

The checked fp32 ONNX file is quantized both ways (static, calibrated on training images, and
dynamic); of those within --max-drop points of the fp32 accuracy the one that agrees most with the
fp32 model is kept, and a larger drop is refused (CheckFailed).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckFailed, TransferkitError
from .compare import parity
from .file_metadata import copy_metadata
from .formats import first_line, quiet
from .request import Int8
from .runtime import onnx_session, run_onnx

log = logging.getLogger(__name__)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def _quantize(fp32: Path, out: Path, method: str, calibration: torch.Tensor) -> None:
    """int8 weights (static: and activations, calibrated on `calibration`), by onnxruntime."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name(out.name + ".pre.onnx")
    try:
        with quiet():
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            if method == "dynamic":
                quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8)
                return

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.batches = iter([calibration[i:i + 16].numpy()
                                         for i in range(0, len(calibration), 16)])

                def get_next(self) -> dict[str, np.ndarray] | None:
                    x = next(self.batches, None)
                    return None if x is None else {"images": x}

            quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)


def quantize_checked(fp32: Path, check: torch.Tensor, fp32_logits: torch.Tensor, int8: Int8,
                     out: Path) -> tuple[Path, dict[str, Any]]:
    """Quantize the checked fp32 file both ways and keep one (see _choose); a drop of more than
    int8.max_drop is refused. Returns the file kept and what export.json records of it."""
    images, labels = int8.accuracy_on
    before = _accuracy(run_onnx(onnx_session(fp32), images), labels)
    tried = _quantize_both(fp32, int8, check, fp32_logits, before)
    if not tried:
        raise CheckFailed(f"onnxruntime could not quantize this model to int8; nothing was "
                          f"written to {out}; export it without --quantize")
    method = _choose(tried, before, int8.max_drop)
    best = tried[method]
    drop = 100 * (before - best["accuracy"])
    if drop > int8.max_drop:
        raise CheckFailed(
            f"int8 ({method}) loses {drop:.2f} points of accuracy on {int8.measured_on} "
            f"({100 * before:.2f}% -> {100 * best['accuracy']:.2f}% on {len(labels)} images), "
            f"more than --max-drop "
            f"{int8.max_drop:g}; nothing was written to {out}. Export fp32 (without --quantize), "
            "or allow more with --max-drop")
    copy_metadata(fp32, best["path"], {"quantization": f"int8 {method}"})
    return best["path"], _int8_record(tried, method, before, int8)


def _quantize_both(fp32: Path, int8: Int8, check: torch.Tensor, fp32_logits: torch.Tensor,
                   before: float) -> dict[str, dict[str, Any]]:
    """Each way onnxruntime quantizes the model (static where there are calibration images, and
    dynamic): its file, its accuracy on int8.accuracy_on and its parity with the fp32 file."""
    images, labels = int8.accuracy_on
    calibration = int8.calibration
    tried: dict[str, dict[str, Any]] = {}
    for method in ("static", "dynamic"):
        if method == "static" and (calibration is None or not len(calibration)):
            continue
        path = fp32.with_name(f"model.int8-{method}.onnx")
        try:
            _quantize(fp32, path, method, calibration)
            session = onnx_session(path)
            after = _accuracy(run_onnx(session, images), labels)
        except TransferkitError:
            raise
        except Exception as e:  # an operator onnxruntime cannot quantize so: try the other way
            log.warning("%s int8 quantization failed (%s)", method, first_line(e))
            continue
        tried[method] = {"path": path, "accuracy": after,
                         "parity": parity(fp32_logits, run_onnx(session, check))}
        log.info("int8 %s: accuracy on %s %.2f%% (fp32 %.2f%%)", method, int8.measured_on,
                 100 * after, 100 * before)
    return tried


def _choose(tried: dict[str, dict[str, Any]], before: float, max_drop: float) -> str:
    """Of the methods within --max-drop, the one that agrees most with the checked fp32 model (a
    small test split ranks two close accuracies by chance); when none is within it, the most
    accurate, to report."""
    within = [m for m in tried if 100 * (before - tried[m]["accuracy"]) <= max_drop]
    if within:
        return max(within, key=lambda m: tried[m]["parity"]["top1_agreement"])
    return max(tried, key=lambda m: tried[m]["accuracy"])


def _int8_record(tried: dict[str, dict[str, Any]], method: str, before: float,
                 int8: Int8) -> dict[str, Any]:
    """What export.json records of an int8 export: both methods' figures, the one kept."""
    best = tried[method]
    static = method == "static" and int8.calibration is not None
    note = "int8 is gated on the accuracy drop, not on these limits"
    return {
        "type": "int8", "method": method,
        "calibration_images": len(int8.calibration) if static else 0,
        "measured_on": int8.measured_on, "images": len(int8.accuracy_on[1]),
        "accuracy_fp32": before,
        "accuracy_int8": best["accuracy"],
        "drop_points": round(100 * (before - best["accuracy"]), 3),
        "max_drop_points": int8.max_drop,
        "tried": {m: {"accuracy_int8": t["accuracy"],
                      "top1_agreement_vs_fp32": t["parity"]["top1_agreement"]}
                  for m, t in tried.items()},
        "parity_vs_fp32": best["parity"] | {"note": note},
    }
