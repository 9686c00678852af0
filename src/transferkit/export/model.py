"""Export a model: write the file, run it beside PyTorch on the check images, keep it if they agree.

Every export runs the PyTorch model (fp32, eval mode, on the CPU) and the exported file side by
side on held-out images and keeps the file only when they agree (written with
files.atomic_write); with --quantize int8 the kept file is the int8 one that passes its gate.
"""

from __future__ import annotations

import copy
import hashlib
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.preprocess import Preprocessing
from ..errors import TransferkitError
from ..files import atomic_write
from ..task import task_of
from .compare import check_parity
from .file_metadata import CHECKSUM_KEY, answering, checksums, metadata, opset_of, seal
from .formats import Deployable, quiet, write_onnx, write_torchscript
from .int8 import quantize_checked
from .request import (
    DEFAULT_OPSET,
    SUFFIX,
    Format,
    Int8,
    Target,
    check_quantizable,
    check_request,
    destinations,
)
from .runtime import onnx_session, run_onnx, run_torch


def export_model(model: nn.Module, preprocessing: Preprocessing, classes: Sequence[str],
                 out: str | Path, check: torch.Tensor, *, fmt: Format = "onnx",
                 batch: int | None = None, opset: int = DEFAULT_OPSET, measured_on: str = "",
                 quantize: str | None = None, calibration: torch.Tensor | None = None,
                 accuracy_on: tuple[torch.Tensor, torch.Tensor] | None = None,
                 max_drop: float = 1.0, overwrite: bool = False) -> dict[str, Any]:
    """Export `model` to `out`, kept only if it agrees with PyTorch on `check`; returns its record.

    `check`: uint8 model input (see as_input). `batch`: a fixed batch size (None: dynamic).
    `quantize="int8"` (ONNX): keep an int8 model, refused when its accuracy on `accuracy_on`
    (input, labels) drops by more than `max_drop` points from the fp32 model's (see Int8).
    `overwrite`: replace an existing file at `out` (never a file of a run folder). A run's model,
    with its ModelCard: export_run, or export_predictor of Predictor.from_run.
    """
    if quantize not in (None, "int8"):
        raise TransferkitError(f"--quantize {quantize}: only int8, and only for --format onnx")
    int8 = Int8(accuracy_on, calibration, max_drop) if quantize else None
    return export_checked(model, preprocessing, metadata(classes, preprocessing),
                          Target(Path(out), fmt, batch, opset, overwrite), check,
                          measured_on=measured_on, int8=int8)


def export_checked(model: nn.Module, pre: Preprocessing, meta: dict[str, str], target: Target,
                   check: torch.Tensor, *, measured_on: str = "",
                   int8: Int8 | None = None) -> dict[str, Any]:
    """Write `target`, kept only if it agrees with PyTorch on `check`; returns the record
    export.json holds of it."""
    check_request(target, check, int8)
    task, thresholds = answering(meta)
    check_quantizable(task, "int8" if int8 is not None else None)
    started = time.perf_counter()
    # PyTorch side of the comparison: fp32, eval mode, on the CPU, whatever the model trained in.
    wrapper = Deployable(copy.deepcopy(model).cpu().float().eval(), pre).eval()
    reference = run_torch(wrapper, check, target.batch)
    record: dict[str, Any] = {
        "format": target.fmt, "file": target.path.name, "batch": target.batch or "dynamic",
        "input": f"uint8 N x 3 x {pre.image_size} x {pre.image_size}",
        "preprocessing": pre.to_dict(), "metadata": meta}
    out = target.path
    with destinations([out], target.overwrite), \
            tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        work = Path(tmp) / ("model" + SUFFIX[target.fmt])
        record["exporter"], exported = _write_and_run(wrapper, target, work, check, meta)
        record["parity"] = check_parity(reference, exported, target, measured_on,
                                        task_of(task), thresholds)
        if int8 is not None:
            work, record["quantization"] = quantize_checked(work, check, exported, int8, out)
        kept = work.read_bytes()
        if target.fmt == "onnx":
            kept = seal(kept)
            record["opset"] = _opset_written(kept, target)
            record["metadata"] = {**meta, CHECKSUM_KEY: checksums(kept)[0]}  # the file's own
        atomic_write(out, kept)
    record["sha256"] = hashlib.sha256(kept).hexdigest()
    record["bytes"] = len(kept)
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def _opset_written(raw: bytes, target: Target) -> int:
    """The opset the file declares, read back from it; one other than --opset is refused."""
    written = opset_of(raw)
    if written != target.opset:
        raise TransferkitError(f"--opset {target.opset}: the exported file came out at opset "
                               f"{written}, and an export writes what was asked or nothing; "
                               f"nothing was written to {target.path}. Pass --opset {written}")
    return written


def _example(check: torch.Tensor, batch: int | None) -> torch.Tensor:
    """The input the exporter traces: `batch` images (the last repeated where `check` holds fewer),
    or two for a dynamic batch."""
    example = check[:batch] if batch else check[:2]
    if batch and len(example) < batch:
        example = torch.cat([example, example[-1:].expand(batch - len(example), -1, -1, -1)])
    return example


def _write_and_run(wrapper: Deployable, target: Target, work: Path, check: torch.Tensor,
                   meta: dict[str, str]) -> tuple[str, torch.Tensor]:
    """Write the file at `work` and run it on `check`: which exporter wrote it, and the file's
    logits."""
    example = _example(check, target.batch)
    if target.fmt == "onnx":
        exporter = write_onnx(wrapper, example, work, target, meta)
        return exporter, run_onnx(onnx_session(work), check)
    exporter = write_torchscript(wrapper, example, work, meta)
    with quiet():
        loaded = torch.jit.load(str(work)).eval()
    return exporter, run_torch(loaded, check, target.batch)
