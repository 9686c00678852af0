"""What an export is asked for (the file, its format, batch and opset; int8), refused before work.

`Target` is the file an export writes and `Int8` the --quantize int8 request with its accuracy
gate; `check_request` and `check_destination` refuse what cannot be exported before any work, and
`require` names the extra that installs the optional ONNX packages. `destinations` holds where the
files go: never onto a file of a run folder, onto another existing file only with --overwrite, in
folders it creates (and removes again when the export fails).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .. import runfiles
from ..errors import TransferkitError
from ..files import temp_beside

Format = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
# the torch.export-based exporter's own default in torch 2.14; onnxruntime 1.17+ runs it
DEFAULT_OPSET = 18
# The opsets both of torch 2.14's exporters write (torch.onnx's ONNX_MIN_OPSET..ONNX_MAX_OPSET),
# each run by onnxruntime 1.32 and checked; below 18 the TorchScript-based exporter writes the file.
MIN_OPSET, MAX_OPSET = 7, 23
INT8_MIN_OPSET = 13  # onnxruntime's per-channel int8 weights (DequantizeLinear's axis) need 13
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
    """The file an export writes: its path, format, batch size (None: any), ONNX opset, and whether
    it may replace an existing file there (--overwrite; never a file of a run folder)."""

    path: Path
    fmt: Format = "onnx"
    batch: int | None = None
    opset: int = DEFAULT_OPSET
    overwrite: bool = False


@dataclass(frozen=True)
class Int8:
    """--quantize int8: keep an int8 ONNX model only if its accuracy on `accuracy_on` (model input,
    labels; `measured_on` says which images, e.g. "the val split of data/") is at most `max_drop`
    points below the fp32 model's; static quantization calibrates its activations on
    `calibration` (model input; None: dynamic only)."""

    accuracy_on: tuple[torch.Tensor, torch.Tensor] | None
    calibration: torch.Tensor | None = None
    max_drop: float = 1.0
    measured_on: str = "the labelled images given"


def check_destination(out: Path, overwrite: bool = False) -> list[Path]:
    """Refuse an --out that cannot be written or must not be replaced, before any work: a file of a
    run folder, another existing file without --overwrite, a foreign export.json beside it. Creates
    its missing folders; returns them, deepest first."""
    out = Path(out)
    if out.name == runfiles.EXPORT:
        raise TransferkitError(f"--out {out}: {runfiles.EXPORT} is the name of the record each "
                               f"export writes beside its file; name the file e.g. "
                               f"{out.with_name('model.onnx')}")
    if runfiles.of_a_run(out):
        raise TransferkitError(f"--out {out} is a file of the run folder {out.parent}, which the "
                               "run needs; an export never replaces it: write elsewhere, e.g. "
                               f"{out.with_name('model.onnx')}")
    if (out.exists() or out.is_symlink()) and not out.is_dir() and not overwrite:
        raise TransferkitError(f"--out {out} already exists; pass --overwrite to replace it, or "
                               "write elsewhere")
    _check_record(out.parent / runfiles.EXPORT, overwrite)
    made = _make_folders(out.parent)
    try:
        fd, tmp = temp_beside(out, "--out", "model.onnx")
    except BaseException:
        remove_folders(made)
        raise
    os.close(fd)
    os.unlink(tmp)
    return made


def _check_record(path: Path, overwrite: bool) -> None:
    """An export.json that is not transferkit's record of exports is replaced only with
    --overwrite."""
    if overwrite or not (path.exists() or path.is_symlink()):
        return
    try:
        entries = json.loads(path.read_text())
        ours = isinstance(entries, dict) and all(isinstance(e, dict) and "format" in e
                                                 for e in entries.values())
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise TransferkitError(f"{path} is not transferkit's record of exports, and an export "
                               "writes its record there; move it, write elsewhere, or pass "
                               "--overwrite to replace it")


def _make_folders(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; the ones created, deepest first."""
    missing = [f for f in (folder, *folder.parents) if not f.exists()]
    there = next((f for f in (folder, *folder.parents) if f.exists()), None)
    if there is not None and not there.is_dir():
        raise TransferkitError(f"--out: {there} is a file, not a folder; pick another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        remove_folders(missing)
        raise TransferkitError(f"--out: cannot create the folder {folder} ({e.strerror or e}); "
                               "create it, or pick a writable place with --out") from None
    return missing


def remove_folders(made: Sequence[Path]) -> None:
    """Remove the folders an export created (deepest first) that are still empty."""
    for folder in made:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def destinations(paths: Sequence[Path], overwrite: bool) -> Iterator[None]:
    """Check each destination (check_destination) for the block; the folders made for them go
    again when the block fails."""
    made: list[Path] = []
    try:
        for path in paths:
            made += check_destination(path, overwrite)
        yield
    except BaseException:
        remove_folders(made)
        raise


def check_opset(opset: int, int8: bool = False) -> None:
    """Refuse an ONNX opset the exporters (or int8 quantization) cannot write, before any work."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise TransferkitError(f"--opset {opset}: transferkit writes ONNX opsets {MIN_OPSET} to "
                               f"{MAX_OPSET} (default {DEFAULT_OPSET}); choose one of those")
    if int8 and opset < INT8_MIN_OPSET:
        raise TransferkitError(f"--opset {opset}: --quantize int8 writes opsets {INT8_MIN_OPSET} "
                               f"to {MAX_OPSET} (its per-channel weights need {INT8_MIN_OPSET}); "
                               "choose one of those, or export fp32 at this opset")


def check_request(target: Target, check: torch.Tensor, int8: Int8 | None) -> None:
    """Refuse what cannot be exported, before any work: the format, its packages, the batch size,
    the check images, int8 outside ONNX or without labelled images, the destination."""
    if target.fmt not in FORMATS:
        raise TransferkitError(f"unknown format '{target.fmt}'; choose one of {', '.join(FORMATS)}")
    if target.fmt == "onnx":
        check_opset(target.opset, int8 is not None)
        require("onnx", "onnxscript", "onnxruntime")
    if int8 is not None and target.fmt != "onnx":
        raise TransferkitError("--quantize int8: only int8, and only for --format onnx")
    if target.batch is not None and target.batch < 1:
        raise TransferkitError(f"--batch {target.batch}: use a whole number of at least 1, or "
                               "dynamic")
    if len(check) == 0:
        raise TransferkitError("the parity check needs at least one image")
    if int8 is not None and int8.accuracy_on is None:
        raise TransferkitError("--quantize int8 needs labelled held-out images to measure the "
                               "accuracy drop")


def check_quantizable(task: str, quantize: str | None) -> None:
    """Refuse int8 for a multi-label model: its gate is the drop in top-1 accuracy, which a set of
    labels per image does not have."""
    if quantize and task == "multilabel":
        raise TransferkitError("--quantize int8 is gated on the drop in top-1 accuracy, which a "
                               "multi-label model (a set of labels per image) does not have; "
                               "export it in fp32 (drop --quantize)")


def check_run_request(formats: Sequence[str], check_images: int, quantize: str | None,
                      opset: int | None = None) -> None:
    """Refuse an unknown format, too few check images, int8 for other than ONNX alone, an opset
    the exporters cannot write or asked for no ONNX file (None: the default)."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise TransferkitError(f"unknown format '{unknown[0]}'; choose onnx, torchscript or all")
    if check_images < 1:
        raise TransferkitError(f"--check-images {check_images}: the parity check needs at least 1 "
                               "image")
    if quantize is not None and list(formats) != ["onnx"]:
        raise TransferkitError("--quantize int8 is for ONNX only; use --format onnx")
    if opset is not None and "onnx" not in formats:
        raise TransferkitError(f"--opset {opset} is for ONNX files; a TorchScript file has no "
                               "opset (add --format onnx, or leave --opset out)")
    if "onnx" in formats:
        check_opset(DEFAULT_OPSET if opset is None else opset, quantize is not None)
