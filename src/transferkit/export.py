"""Export a classifier to ONNX or TorchScript, kept only when it agrees with PyTorch on real images.

The exported graph takes what a deployer has, uint8 RGB images (N, 3, S, S) at the model's input
side, and does the /255, mean and std itself; it returns the logits. What a consumer must still do
(resize the shorter side with the run's interpolation, crop the center) travels in the file as the
run's `Preprocessing` itself (its to_dict), with the class names and the run's `ModelCard` itself
(its to_json): ONNX `metadata_props`, TorchScript `_extra_files`, and export.json. `OnnxPredictor`
reads them back, so it reads and resizes a photo exactly as `Predictor` does for the run folder.
Every export runs the PyTorch model (fp32) and the exported file side by side on held-out images
and keeps the file only when they agree (written with files.atomic_write).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from . import runfiles
from .checkpoint import ModelCard, read_card
from .data.preprocess import Preprocessing, upsample
from .data.sources import DataSource, is_named
from .data.splits import Split, stratified_subset
from .data.transforms import batches
from .errors import CheckFailed, TransferkitError
from .files import atomic_write, temp_beside
from .predict import Predictor, held_out_record, split_to_score, stored
from .version import __version__

log = logging.getLogger(__name__)

Format = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
EXPORT_FILE = runfiles.EXPORT
# the torch.export-based exporter's own default in torch 2.14; onnxruntime 1.17+ runs it
DEFAULT_OPSET = 18
MAX_PROB_DIFF = 1e-4  # largest |softmax(PyTorch) - softmax(exported)| an fp32 export may show
EXTRA_FILE = "transferkit.json"  # TorchScript: the metadata, in the file's extra files
INSTALL_HINT = "pip install 'transferkit[export]'"
RUN_BATCH = 32  # images per call when running either model over the check images


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


PREPROCESSING_KEY = "preprocessing"  # the metadata entry that holds Preprocessing.to_dict() as JSON
CARD_KEY = "model_card"  # the metadata entry that holds a run's ModelCard.to_json(), model.json


def metadata(classes: Sequence[str], pre: Preprocessing, *, temperature: float = 1.0,
             card: ModelCard | None = None, source: str = "") -> dict[str, str]:
    """What a consumer needs besides the graph, as the string pairs ONNX metadata_props holds.

    `preprocessing` is the Preprocessing itself (to_dict, as JSON) and `model_card` a run's
    ModelCard itself (to_json, as model.json holds it, with the classes, preprocessing and
    temperature exported): the entries transferkit reads back. The fields a consumer needs are
    also entries of their own (a number or a name as text, a list as JSON), for readers of single
    keys (earlier transferkit wrote only those).
    """
    rule = pre.to_dict()
    side = pre.image_size
    if card is not None:
        card = card.replace(classes=list(classes), preprocessing=pre, temperature=temperature)
    return {
        "transferkit_version": __version__,
        "classes": json.dumps(list(classes)),
        "input": f"uint8 RGB images, N x 3 x {side} x {side} (NCHW); /255, mean and std are inside "
                 "the graph",
        "output": "logits (N x classes); probabilities are softmax(logits / temperature)",
        PREPROCESSING_KEY: json.dumps(rule),
        **{k: v if isinstance(v, str) else json.dumps(v) for k, v in rule.items()},
        "crop": "center",
        "resize": f"shorter side to {pre.resize_size} px ({pre.interpolation}, antialiased), then "
                  f"a center crop of {side} x {side}; a square image no larger than {side} px is "
                  "instead upsampled whole (bilinear, no antialiasing, rounded to uint8)",
        "temperature": repr(float(temperature)),
        "weights_sha256": (card.sha256 if card is not None else None) or "",
        "source": source,
        **({CARD_KEY: card.to_json()} if card is not None else {}),
    }


def preprocessing_of(meta: dict[str, str]) -> Preprocessing:
    """The Preprocessing that a file's transferkit metadata holds.

    A file written before the metadata held it whole names its fields one by one and no
    interpolation: it was bilinear."""
    if PREPROCESSING_KEY in meta:
        return Preprocessing.from_dict(json.loads(meta[PREPROCESSING_KEY]))
    fields = ("image_size", "resize_size", "mean", "std")
    return Preprocessing.from_dict({k: json.loads(meta[k]) for k in fields})


def card_of(meta: dict[str, str]) -> ModelCard | None:
    """The run's ModelCard that a file's transferkit metadata holds; None for a file without one
    (a model exported without a run, or by transferkit before the metadata held the card)."""
    return ModelCard.from_json(meta[CARD_KEY]) if CARD_KEY in meta else None


def as_input(pre: Preprocessing, images: torch.Tensor) -> torch.Tensor:
    """Stored uint8 images (N, 1 or 3, h, w) as the exported graph's input: uint8 (N, 3, S, S)."""
    if images.shape[-2:] != (pre.image_size, pre.image_size):
        images = upsample(images, pre.image_size)
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    return images.contiguous()


# --- writing the formats ---------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    """An exception's first line, without terminal colours, at most 200 characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _operator(e: BaseException) -> str:
    """The operator an exporter error names, e.g. 'aten::histc', or ''."""
    found = re.findall(r"aten(?:::|\.)([a-z_0-9]+)", str(e))
    return f"aten::{found[0]}" if found else ""


@contextlib.contextmanager
def _quiet() -> Any:
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


def _write_onnx(wrapper: Deployable, example: torch.Tensor, path: Path, target: Target,
                meta: dict[str, str]) -> str:
    """Write `path` as `target` asks; returns which exporter made it.

    torch.export's (a clean, folded graph) first, the TorchScript-based one where torch.export
    cannot capture the model."""
    import onnx

    dynamic = target.batch is None
    kw: dict[str, Any] = dict(input_names=["images"], output_names=["logits"],
                              opset_version=target.opset)
    try:
        with _quiet():
            shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
            torch.onnx.export(wrapper, (example,), str(path), dynamo=True, dynamic_shapes=shapes,
                              optimize=True, external_data=False, verbose=False, **kw)
        exporter = "torch.export"
    except Exception as first:  # the exporters raise many types; each is reported, none is hidden
        log.info("torch.export could not capture the model (%s); trying the TorchScript-based "
                 "exporter", _first_line(first))
        axes = {"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
        try:
            with _quiet():
                torch.onnx.export(wrapper, (example,), str(path), dynamo=False, dynamic_axes=axes,
                                  **kw)
            exporter = "torchscript-based"
        except Exception as second:
            raise _untraceable("onnx", wrapper, example, second, first) from None
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return exporter


def _trace(wrapper: Deployable, example: torch.Tensor) -> torch.jit.ScriptModule:
    with _quiet():
        return torch.jit.trace(wrapper, example, check_trace=False)


def _write_torchscript(wrapper: Deployable, example: torch.Tensor, path: Path,
                       meta: dict[str, str]) -> str:
    try:
        traced = _trace(wrapper, example)
    except Exception as e:
        raise _untraceable("torchscript", wrapper, example, e) from None
    with _quiet():
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps(meta)})
    return "torch.jit.trace"


def _untraceable(fmt: str, wrapper: Deployable, example: torch.Tensor,
                 *errors: BaseException) -> TransferkitError:
    """The exporter's failure as one sentence: the operator, and whether the other format works."""
    op = next((o for o in map(_operator, errors) if o), "")
    if op:
        what = f"its operator {op} has no {fmt} export"
    else:
        what = f"{type(errors[0]).__name__}: {_first_line(errors[0])}"
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


# --- running and comparing ---------------------------------------------------------------------


def onnx_session(path: Path) -> Any:
    """An onnxruntime CPU session of `path`, or a clear error for a file that is no whole model."""
    require("onnxruntime")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise TransferkitError(f"{path} is not a readable ONNX model ({_first_line(e)}): the "
                               "file is truncated or damaged; export it again with 'transferkit "
                               "export RUN'") from None


def _fixed_batch(session: Any) -> int | None:
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) else None


def run_onnx(session: Any, images: torch.Tensor) -> torch.Tensor:
    """fp32 logits of uint8 model input through onnxruntime (a fixed batch: the last one padded)."""
    fixed = _fixed_batch(session)
    step = fixed or RUN_BATCH
    name = session.get_inputs()[0].name
    out = []
    for start in range(0, len(images), step):
        chunk = images[start:start + step].numpy()
        n = len(chunk)
        if fixed and n < fixed:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
        logits = session.run(None, {name: chunk})[0][:n]
        out.append(torch.from_numpy(logits.astype(np.float32)))
    return torch.cat(out)


@torch.no_grad()
def run_torch(module: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
              batch: int | None = None) -> torch.Tensor:
    """fp32 logits of uint8 model input through a PyTorch module (eager or TorchScript), on CPU."""
    step = batch or RUN_BATCH
    out = []
    for start in range(0, len(images), step):
        chunk = images[start:start + step]
        n = len(chunk)
        if batch and n < batch:
            chunk = torch.cat([chunk, chunk[-1:].expand(batch - n, -1, -1, -1)])
        out.append(module(chunk)[:n].float())
    return torch.cat(out)


def parity(reference: torch.Tensor, exported: torch.Tensor) -> dict[str, Any]:
    """Top-1 agreement and the largest absolute difference of the softmax probabilities."""
    p, q = reference.softmax(1), exported.softmax(1)
    return {"images": len(reference),
            "top1_agreement": float((p.argmax(1) == q.argmax(1)).float().mean()),
            "max_abs_prob_diff": float((p - q).abs().max()),
            "max_abs_logit_diff": float((reference - exported).abs().max())}


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


# --- int8 --------------------------------------------------------------------------------------


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
        with _quiet():
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


def _copy_metadata(src: Path, dst: Path, extra: dict[str, str]) -> None:
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(src)).metadata_props}
    model = onnx.load(str(dst))
    del model.metadata_props[:]
    for k, v in {**meta, **extra}.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(dst))


# --- the export --------------------------------------------------------------------------------


def check_destination(out: Path) -> None:
    """Refuse an --out that cannot be written, before any work."""
    fd, tmp = temp_beside(out, "--out", "model.onnx")
    os.close(fd)
    os.unlink(tmp)


def export_model(model: nn.Module, preprocessing: Preprocessing, classes: Sequence[str],
                 out: str | Path, check: torch.Tensor, *, fmt: Format = "onnx",
                 batch: int | None = None, opset: int = DEFAULT_OPSET, measured_on: str = "",
                 quantize: str | None = None, calibration: torch.Tensor | None = None,
                 accuracy_on: tuple[torch.Tensor, torch.Tensor] | None = None,
                 max_drop: float = 1.0) -> dict[str, Any]:
    """Export `model` to `out`, kept only if it agrees with PyTorch on `check`; returns its record.

    `check`: uint8 model input (see as_input). `batch`: a fixed batch size (None: dynamic).
    `quantize="int8"` (ONNX): keep an int8 model, refused when its accuracy on `accuracy_on`
    (input, labels) drops by more than `max_drop` points from the fp32 model's (see Int8). A run's
    model, with its ModelCard: export_run, or export_predictor of Predictor.from_run.
    """
    if quantize not in (None, "int8"):
        raise TransferkitError(f"--quantize {quantize}: only int8, and only for --format onnx")
    int8 = Int8(accuracy_on, calibration, max_drop) if quantize else None
    return _export(model, preprocessing, metadata(classes, preprocessing),
                   Target(Path(out), fmt, batch, opset), check, measured_on=measured_on, int8=int8)


def _export(model: nn.Module, pre: Preprocessing, meta: dict[str, str], target: Target,
            check: torch.Tensor, *, measured_on: str = "",
            int8: Int8 | None = None) -> dict[str, Any]:
    """Write `target`, kept only if it agrees with PyTorch on `check`; returns the record
    export.json holds of it."""
    _check_request(target, check, int8)
    started = time.perf_counter()
    # PyTorch side of the comparison: fp32, eval mode, on the CPU, whatever the model trained in.
    wrapper = Deployable(copy.deepcopy(model).cpu().float().eval(), pre).eval()
    reference = run_torch(wrapper, check, target.batch)
    record: dict[str, Any] = {
        "format": target.fmt, "file": target.path.name, "batch": target.batch or "dynamic",
        "input": f"uint8 N x 3 x {pre.image_size} x {pre.image_size}",
        "preprocessing": pre.to_dict(), "metadata": meta}
    out = target.path
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        work = Path(tmp) / ("model" + SUFFIX[target.fmt])
        written, exported = _write_and_run(wrapper, target, work, check, meta)
        record.update(written)
        record["parity"] = _check_parity(reference, exported, target, measured_on)
        if int8 is not None:
            work, record["quantization"] = _int8(work, check, exported, int8, out)
        kept = work.read_bytes()
        atomic_write(out, kept)
    record["sha256"] = hashlib.sha256(kept).hexdigest()
    record["bytes"] = len(kept)
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def _check_request(target: Target, check: torch.Tensor, int8: Int8 | None) -> None:
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


def _example(check: torch.Tensor, batch: int | None) -> torch.Tensor:
    """The input the exporter traces: `batch` images (the last repeated where `check` holds fewer),
    or two for a dynamic batch."""
    example = check[:batch] if batch else check[:2]
    if batch and len(example) < batch:
        example = torch.cat([example, example[-1:].expand(batch - len(example), -1, -1, -1)])
    return example


def _write_and_run(wrapper: Deployable, target: Target, work: Path, check: torch.Tensor,
                   meta: dict[str, str]) -> tuple[dict[str, Any], torch.Tensor]:
    """Write the file at `work` and run it on `check`: what the record says of the writing (the
    exporter, the opset), and the file's logits."""
    example = _example(check, target.batch)
    if target.fmt == "onnx":
        exporter = _write_onnx(wrapper, example, work, target, meta)
        return {"exporter": exporter, "opset": target.opset}, run_onnx(onnx_session(work), check)
    exporter = _write_torchscript(wrapper, example, work, meta)
    with _quiet():
        loaded = torch.jit.load(str(work)).eval()
    return {"exporter": exporter}, run_torch(loaded, check, target.batch)


def _check_parity(reference: torch.Tensor, exported: torch.Tensor, target: Target,
                  measured_on: str) -> dict[str, Any]:
    """The parity figures export.json records; an export that disagrees is refused (CheckFailed)."""
    figures = parity(reference, exported)
    passed = figures["top1_agreement"] == 1.0 and figures["max_abs_prob_diff"] <= MAX_PROB_DIFF
    log.info("parity %s vs PyTorch on %d images: top-1 agreement %.2f%%, max |softmax difference| "
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


def _int8(fp32: Path, check: torch.Tensor, fp32_logits: torch.Tensor, int8: Int8,
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
            f"int8 ({method}) loses {drop:.2f} points of test accuracy ({100 * before:.2f}% -> "
            f"{100 * best['accuracy']:.2f}% on {len(labels)} images), more than --max-drop "
            f"{int8.max_drop:g}; nothing was written to {out}. Export fp32 (without --quantize), "
            "or allow more with --max-drop")
    _copy_metadata(fp32, best["path"], {"quantization": f"int8 {method}"})
    return best["path"], _int8_record(tried, method, before, int8)


def _quantize_both(fp32: Path, int8: Int8, check: torch.Tensor, fp32_logits: torch.Tensor,
                   before: float) -> dict[str, dict[str, Any]]:
    """Each way onnxruntime quantizes the model (static where there are calibration images, and
    dynamic): its file, its test accuracy and its parity with the fp32 file."""
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
            log.warning("%s int8 quantization failed (%s)", method, _first_line(e))
            continue
        tried[method] = {"path": path, "accuracy": after,
                         "parity": parity(fp32_logits, run_onnx(session, check))}
        log.info("int8 %s: test accuracy %.2f%% (fp32 %.2f%%)", method, 100 * after, 100 * before)
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
        "test_images": len(int8.accuracy_on[1]), "accuracy_fp32": before,
        "accuracy_int8": best["accuracy"],
        "drop_points": round(100 * (before - best["accuracy"]), 3),
        "max_drop_points": int8.max_drop,
        "tried": {m: {"accuracy_int8": t["accuracy"],
                      "top1_agreement_vs_fp32": t["parity"]["top1_agreement"]}
                  for m, t in tried.items()},
        "parity_vs_fp32": best["parity"] | {"note": note},
    }


# --- a run folder ------------------------------------------------------------------------------


def _images(split: Split, pre: Preprocessing, count: int | None = None,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 model input, labels) of a class-balanced, seeded subset of `count` images of a split
    (None: all)."""
    if count is not None and count < len(split):
        split = split.subset(stratified_subset(split.labels, count, seed)[:count])
    xs, ys = [], []
    for images, labels in batches(split, 64):
        xs.append(as_input(pre, images))
        ys.append(labels)
    return torch.cat(xs), torch.cat(ys)


def export_predictor(predictor: Predictor, out: str | Path, images: Sequence[Any], *,
                     fmt: Format = "onnx", batch: int | None = None, opset: int = DEFAULT_OPSET,
                     int8: Int8 | None = None) -> dict[str, Any]:
    """Export a Predictor (e.g. Predictor.from_pretrained) checked on `images` (paths, PIL images,
    arrays); a run's Predictor (from_run) writes its ModelCard into the file."""
    pre = predictor.preprocessing
    check = torch.cat([as_input(pre, stored(pre, im)[None]) for im in images])
    meta = metadata(predictor.classes, pre, temperature=predictor.temperature,
                    card=predictor.card)
    return _export(predictor.model, pre, meta, Target(Path(out), fmt, batch, opset), check,
                   measured_on=f"{len(check)} images given", int8=int8)


def default_out(run_dir: Path, fmt: str, quantize: str | None = None) -> Path:
    """RUN/model.onnx, RUN/model.pt, RUN/model.int8.onnx."""
    name = f"model.{quantize}{SUFFIX[fmt]}" if quantize else f"model{SUFFIX[fmt]}"
    return Path(run_dir) / name


def export_run(run_dir: str | Path, formats: Sequence[str] = ("onnx",), *,
               out: str | Path | None = None, batch: int | None = None, opset: int = DEFAULT_OPSET,
               check_images: int = 256, data: str | None = None, data_dir: str | None = None,
               quantize: str | None = None, max_drop: float = 1.0,
               workers: int = 2) -> list[dict[str, Any]]:
    """Export a run folder to each format, checked on its held-out images (or `data`'s).

    Each export is recorded in export.json beside its file; returns the records."""
    run_dir = Path(run_dir)
    _check_run_request(formats, check_images, quantize)
    card = read_card(run_dir)
    if "onnx" in formats:
        require("onnx", "onnxscript", "onnxruntime")
    paths = [_target(run_dir, f, out, len(formats) > 1, quantize) for f in formats]
    targets = [Target(path, f, batch, opset) for path, f in zip(paths, formats)]
    for t in targets:
        check_destination(t.path)
    # One reading of model.json; model.safetensors is checked against its sha256.
    pred = Predictor.from_run(run_dir, device="cpu", card=card)
    pre = pred.preprocessing
    source, own = _data_to_check(run_dir, card, data)
    scored = dict(record=held_out_record(run_dir, source) if own else None, data_dir=data_dir,
                  workers=workers, same_pre=True)
    held, src, _ = split_to_score(run_dir, source, None, pre, **scored)
    check, _ = _images(held, pre, check_images)
    measured_on = f"{len(check)} images of the {held.name} split of {source}"
    int8 = None
    if quantize:
        int8 = Int8(_labelled(held, src, pred.classes, pre, source),
                    _calibration(run_dir, source, pre, scored), max_drop)
    meta = metadata(pred.classes, pre, temperature=pred.temperature, card=card,
                    source=f"transferkit run {run_dir.name} ({card.arch}, trained on {card.data})")
    records = []
    for target in targets:
        rec = _export(pred.model, pre, meta, target, check, measured_on=measured_on, int8=int8)
        rec["run"], rec["path"] = str(run_dir), str(target.path)
        _record(target.path, rec)
        records.append(rec)
    return records


def _check_run_request(formats: Sequence[str], check_images: int, quantize: str | None) -> None:
    """Refuse an unknown format, too few check images, or int8 for other than ONNX alone."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise TransferkitError(f"unknown format '{unknown[0]}'; choose onnx, torchscript or all")
    if check_images < 1:
        raise TransferkitError(f"--check-images {check_images}: the parity check needs at least 1 "
                               "image")
    if quantize is not None and list(formats) != ["onnx"]:
        raise TransferkitError("--quantize int8 is for ONNX only; use --format onnx")


def _data_to_check(run_dir: Path, card: ModelCard, data: str | None) -> tuple[str, bool]:
    """The data whose images check the export, and whether it is the run's own (the default)."""
    source = data or card.data
    if not source:
        raise TransferkitError(f"{run_dir / runfiles.CARD} records no data set; pass --data DIR "
                               "with images of its classes for the parity check")
    own = data is None
    if own and not Path(source).expanduser().exists() and not is_named(source):
        raise TransferkitError(f"the run's data {source} (recorded in {run_dir / runfiles.CARD}) "
                               "is missing; pass --data DIR with images of its classes for the "
                               "parity check")
    return source, own


def _labelled(held: Split, src: DataSource, classes: list[str], pre: Preprocessing,
              source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All of the held-out split as (model input, the model's class index): what int8's accuracy
    drop is measured on."""
    images, labels = _images(held, pre)
    if sorted(src.classes) != sorted(classes):
        raise TransferkitError(f"the classes of {source} are not the run's; --quantize measures "
                               "accuracy on data with the run's classes")
    return images, torch.tensor([classes.index(c) for c in src.classes])[labels]


def _calibration(run_dir: Path, source: str, pre: Preprocessing,
                 scored: dict[str, Any]) -> torch.Tensor:
    """128 of the run's training images (class-balanced, seeded): what static int8 calibrates on."""
    train, _, _ = split_to_score(run_dir, source, "train", pre, **scored)
    return _images(train, pre, 128, seed=1)[0]


def _target(run_dir: Path, fmt: str, out: str | Path | None, several: bool,
            quantize: str | None) -> Path:
    """Where a format's file goes: --out (its suffix per format when there are several), else the
    run folder."""
    if out is None:
        return default_out(run_dir, fmt, quantize)
    out = Path(out)
    return out.with_suffix(SUFFIX[fmt]) if several else out


def _record(target: Path, rec: dict[str, Any]) -> None:
    """Add this export to export.json beside the file (one entry per file name)."""
    path = target.parent / EXPORT_FILE
    try:
        existing = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(existing, dict):
            existing = {}
    except (OSError, ValueError):
        existing = {}
    existing[target.name] = rec
    atomic_write(path, json.dumps(existing, indent=2))


# --- predicting with an exported file ----------------------------------------------------------


class OnnxPredictor(Predictor):
    """A transferkit ONNX file run by onnxruntime, with the Predictor's answers (predict, ...).

    Only the model input (the graph's uint8 images) and the forward pass are its own: reading and
    resizing files (by the Preprocessing the file holds), --tta and top-k are the Predictor's;
    the classes and temperature are those of the run's ModelCard the file holds.
    """

    # no super().__init__: no torch model
    def __init__(self, path: str | Path, *, tta: bool = False) -> None:
        path = Path(path)
        if not path.is_file():
            raise TransferkitError(f"no such ONNX file: {path}")
        self.session = onnx_session(path)
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        if "classes" not in meta or "image_size" not in meta:
            raise TransferkitError(f"{path} holds no transferkit metadata (class names, input "
                                   "size, preprocessing); predict with a file written by "
                                   "'transferkit export RUN', or pass the run folder")
        try:
            self.card = card_of(meta)
            self.preprocessing = preprocessing_of(meta)
            if self.card is not None:
                self.classes, self.temperature = self.card.classes, self.card.temperature
            else:  # a model exported without a run, or a file of an earlier transferkit
                self.classes = list(json.loads(meta["classes"]))
                self.temperature = float(meta.get("temperature", 1.0))
        except (ValueError, TypeError, KeyError) as e:
            raise TransferkitError(f"{path}: its transferkit metadata is damaged ({e}); export the "
                                   "run again") from None
        self.metadata = meta
        self.model = None
        self.device = torch.device("cpu")
        self.precision = "fp32"
        self.tta = tta

    def _input(self, stored: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([as_input(self.preprocessing, t[None]) for t in stored])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_onnx(self.session, x.contiguous())
