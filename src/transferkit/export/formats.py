"""Writing the formats: the model with its preprocessing inside (Deployable) to ONNX or TorchScript.

The exported graph takes what a deployer has, uint8 RGB images (N, 3, S, S) at the model's input
side, and does the /255, mean and std itself; it returns the logits. An exporter's failure becomes
one sentence that names the operator and whether the other format works; the exporters' own
progress and graph dumps are silenced.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.preprocess import Preprocessing
from ..errors import TransferkitError
from .file_metadata import EXTRA_FILE, set_onnx_metadata
from .request import Target

log = logging.getLogger(__name__)


class Deployable(nn.Module):
    """uint8 RGB images (N, 3, S, S) -> logits: the model with its /255 and normalization inside."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.model = model
        mean = torch.tensor(preprocessing.mean, dtype=torch.float32)
        std = torch.tensor(preprocessing.std, dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, 3, 1, 1))
        self.register_buffer("std", std.view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The same operations, in the same order, as Preprocessing.to_input: the numbers match to
        # the last bit.
        x = images.float() / 255
        return self.model((x - self.mean) / self.std)


def first_line(e: BaseException) -> str:
    """An exception's first line, without terminal colours, at most 200 characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _operator(e: BaseException) -> str:
    """The operator an exporter error names, e.g. 'aten::histc', or ''."""
    found = re.findall(r"aten(?:::|\.)([a-z_0-9]+)", str(e))
    return f"aten::{found[0]}" if found else ""


@contextlib.contextmanager
def quiet() -> Any:
    """Silence the exporters' progress and graph dumps: the user sees transferkit's one line."""
    sink = io.StringIO()
    # The TorchScript-based exporter prints graphs from C++, to the file descriptors themselves.
    saved = []
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        saved = [(fd, os.dup(fd)) for fd in (1, 2)]
        for fd, _ in saved:
            os.dup2(devnull, fd)
        os.close(devnull)
    names = ("torch.export", "torch._dynamo", "torch.fx", "torch.onnx",
             "torch.fx.experimental.symbolic_shapes", "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
                contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        for fd, copy_of in saved:
            os.dup2(copy_of, fd)
            os.close(copy_of)


# torch.export's exporter writes opset 18 or later: asked for less, it falls back to 18 where its
# conversion fails (every torchvision model tried), so a lower opset goes to the TorchScript-based
# exporter.
DYNAMO_MIN_OPSET = 18


def write_onnx(wrapper: Deployable, example: torch.Tensor, path: Path, target: Target,
               meta: dict[str, str]) -> str:
    """Write `path` as `target` asks; returns which exporter made it.

    torch.export's (a clean, folded graph) first, the TorchScript-based one where torch.export
    cannot capture the model or the opset is below DYNAMO_MIN_OPSET."""
    dynamic = target.batch is None
    kw: dict[str, Any] = dict(input_names=["images"], output_names=["logits"],
                              opset_version=target.opset)
    errors: list[BaseException] = []
    if target.opset >= DYNAMO_MIN_OPSET:
        try:
            with quiet():
                shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
                torch.onnx.export(wrapper, (example,), str(path), dynamo=True,
                                  dynamic_shapes=shapes, optimize=True, external_data=False,
                                  verbose=False, **kw)
            set_onnx_metadata(path, meta)
            return "torch.export"
        except Exception as first:  # the exporters raise many types; each is reported
            log.info("torch.export could not capture the model (%s); trying the TorchScript-based "
                     "exporter", first_line(first))
            errors.append(first)
    axes = {"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    try:
        with quiet():
            torch.onnx.export(wrapper, (example,), str(path), dynamo=False, dynamic_axes=axes, **kw)
    except Exception as second:
        low = (f"at --opset {target.opset}; a higher --opset may export it"
               if target.opset < DYNAMO_MIN_OPSET else "")
        raise _untraceable("onnx", wrapper, example, second, *errors, note=low) from None
    set_onnx_metadata(path, meta)
    return "torchscript-based"


def _trace(wrapper: Deployable, example: torch.Tensor) -> torch.jit.ScriptModule:
    with quiet():
        return torch.jit.trace(wrapper, example, check_trace=False)


def write_torchscript(wrapper: Deployable, example: torch.Tensor, path: Path,
                      meta: dict[str, str]) -> str:
    """Write `path` as a traced TorchScript file with `meta` in its extra files; returns how."""
    try:
        traced = _trace(wrapper, example)
    except Exception as e:
        raise _untraceable("torchscript", wrapper, example, e) from None
    with quiet():
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps(meta)})
    return "torch.jit.trace"


def _untraceable(fmt: str, wrapper: Deployable, example: torch.Tensor,
                 *errors: BaseException, note: str = "") -> TransferkitError:
    """The exporter's failure as one sentence: the operator, and whether the other format works
    (`note`: what else might, e.g. another opset)."""
    op = next((o for o in map(_operator, errors) if o), "")
    if op:
        what = f"its operator {op} has no {fmt} export"
    else:
        what = f"{type(errors[0]).__name__}: {first_line(errors[0])}"
    if note:
        what = f"{what} {note}"
    other = "torchscript" if fmt == "onnx" else "onnx"
    if other == "torchscript":
        try:
            _trace(wrapper, example)
            works = "--format torchscript exports it (checked against PyTorch like any export)"
        except Exception:
            works = "--format torchscript cannot trace it either"
    else:
        works = "try --format onnx"
    return TransferkitError(f"the model cannot be exported to {fmt} ({what}); {works}, or replace "
                            "that operation in the model")
