"""What an export is asked for (the file, its format, batch and opset; int8), refused before work.

`Target` is the file an export writes and `Int8` the --quantize int8 request with its accuracy
gate; `check_request` and `check_destination` refuse what cannot be exported before any work, and
`require` names the extra that installs the optional ONNX packages.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..errors import TransferkitError
from ..files import temp_beside

Format = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
# the torch.export-based exporter's own default in torch 2.14; onnxruntime 1.17+ runs it
DEFAULT_OPSET = 18
INSTALL_HINT = "pip install 'transferkit[export]'"


def require(*modules: str) -> None:
    """Import the optional export packages, or say which extra installs them."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise TransferkitError(f"ONNX export and inference need the packages {', '.join(missing)}, "
                               f"which are not installed; install them with {INSTALL_HINT}")


@dataclass(frozen=True)
class Target:
    """The file an export writes: its path, format, batch size (None: any) and ONNX opset."""

    path: Path
    fmt: Format = "onnx"
    batch: int | None = None
    opset: int = DEFAULT_OPSET


@dataclass(frozen=True)
class Int8:
    """--quantize int8: keep an int8 ONNX model only if its accuracy on `accuracy_on` (model input,
    labels) is at most `max_drop` points below the fp32 model's; static quantization calibrates
    its activations on `calibration` (model input; None: dynamic only)."""

    accuracy_on: tuple[torch.Tensor, torch.Tensor] | None
    calibration: torch.Tensor | None = None
    max_drop: float = 1.0


def check_destination(out: Path) -> None:
    """Refuse an --out that cannot be written, before any work."""
    fd, tmp = temp_beside(out, "--out", "model.onnx")
    os.close(fd)
    os.unlink(tmp)


def check_request(target: Target, check: torch.Tensor, int8: Int8 | None) -> None:
    """Refuse what cannot be exported, before any work: the format, its packages, the batch size,
    the check images, int8 outside ONNX or without labelled images, the destination."""
    if target.fmt not in FORMATS:
        raise TransferkitError(f"unknown format '{target.fmt}'; choose one of {', '.join(FORMATS)}")
    if target.fmt == "onnx":
        require("onnx", "onnxscript", "onnxruntime")
    if int8 is not None and target.fmt != "onnx":
        raise TransferkitError("--quantize int8: only int8, and only for --format onnx")
    if target.batch is not None and target.batch < 1:
        raise TransferkitError(f"--batch {target.batch}: use a whole number of at least 1, or "
                               "dynamic")
    if len(check) == 0:
        raise TransferkitError("the parity check needs at least one image")
    if int8 is not None and int8.accuracy_on is None:
        raise TransferkitError("--quantize int8 needs labelled test images to measure the accuracy "
                               "drop")
    check_destination(target.path)


def check_run_request(formats: Sequence[str], check_images: int, quantize: str | None) -> None:
    """Refuse an unknown format, too few check images, or int8 for other than ONNX alone."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise TransferkitError(f"unknown format '{unknown[0]}'; choose onnx, torchscript or all")
    if check_images < 1:
        raise TransferkitError(f"--check-images {check_images}: the parity check needs at least 1 "
                               "image")
    if quantize is not None and list(formats) != ["onnx"]:
        raise TransferkitError("--quantize int8 is for ONNX only; use --format onnx")
