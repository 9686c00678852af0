"""Export a classifier to ONNX or TorchScript, checked against PyTorch on real images before it is kept.

The exported graph takes what a deployer has, uint8 RGB images (N, 3, S, S) at the model's input
side, and does the /255, mean and std itself; it returns the logits. What a consumer must still do
(resize the shorter side with the run's interpolation, crop the center) travels in the file as the
run's `Preprocessing` itself (its to_dict), with the class names: ONNX `metadata_props`, TorchScript
`_extra_files`, and export.json. `OnnxPredictor` reads that Preprocessing back, so it reads and
resizes a photo exactly as `Predictor` does for the run folder. Every export runs the PyTorch model
(fp32) and the exported file side by side on held-out images and keeps the file only when they agree
(written with files.atomic_write).
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
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .checkpoint import read_card
from .data.preprocess import Preprocessing, upsample
from .data.splits import Split, stratified_subset
from .data.transforms import batches
from .errors import CheckFailed, TransferkitError
from .files import atomic_write, temp_beside
from .version import __version__

log = logging.getLogger(__name__)

Format = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
EXPORT_FILE = "export.json"
DEFAULT_OPSET = 18  # the torch.export-based exporter's own default in torch 2.14; onnxruntime 1.17+ runs it
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
        raise TransferkitError(f"ONNX export and inference need the packages {', '.join(missing)}, which are not "
                               f"installed; install them with {INSTALL_HINT}")


class Deployable(nn.Module):
    """uint8 RGB images (N, 3, S, S) -> logits: the model with its /255 and normalization inside."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The same operations, in the same order, as Preprocessing.to_input: the numbers match to the last bit.
        x = images.float() / 255
        return self.model((x - self.mean) / self.std)


PREPROCESSING_KEY = "preprocessing"  # the metadata entry that holds Preprocessing.to_dict() as JSON


def metadata(classes: Sequence[str], pre: Preprocessing, *, sha256: str | None, temperature: float = 1.0,
             source: str = "") -> dict[str, str]:
    """What a consumer needs besides the graph, as the string pairs ONNX metadata_props holds.

    `preprocessing` is the Preprocessing itself (to_dict, as JSON), the entry transferkit reads
    back; each of its fields is also an entry of its own (a number or a name as text, a list as
    JSON), for readers of single keys (earlier transferkit wrote only those).
    """
    rule = pre.to_dict()
    side = pre.image_size
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
        "weights_sha256": sha256 or "",
        "source": source,
    }


def preprocessing_of(meta: dict[str, str]) -> Preprocessing:
    """The Preprocessing that a file's transferkit metadata holds. A file written before the
    metadata held it whole names its fields one by one and no interpolation: it was bilinear."""
    if PREPROCESSING_KEY in meta:
        return Preprocessing.from_dict(json.loads(meta[PREPROCESSING_KEY]))
    fields = ("image_size", "resize_size", "mean", "std")
    return Preprocessing.from_dict({k: json.loads(meta[k]) for k in fields})


def as_input(pre: Preprocessing, stored: torch.Tensor) -> torch.Tensor:
    """Stored uint8 images (N, 1 or 3, h, w) as the exported graph's input: uint8 (N, 3, S, S)."""
    if stored.shape[-2:] != (pre.image_size, pre.image_size):
        stored = upsample(stored, pre.image_size)
    return stored.expand(-1, 3, -1, -1).contiguous() if stored.shape[1] == 1 else stored.contiguous()


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
    """The exporters print progress and dump graphs; the user sees transferkit's one line instead."""
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
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._dynamo", "torch.fx", "torch.onnx",
                                              "torch.fx.experimental.symbolic_shapes", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        for fd, copy_of in saved:
            os.dup2(copy_of, fd)
            os.close(copy_of)


def _write_onnx(wrapper: Deployable, example: torch.Tensor, path: Path, *, dynamic: bool, opset: int,
                meta: dict[str, str]) -> str:
    """Write `path`; returns which exporter made it. torch.export's (a clean, folded graph) first, the
    TorchScript-based one where torch.export cannot capture the model."""
    import onnx

    kw: dict[str, Any] = dict(input_names=["images"], output_names=["logits"], opset_version=opset)
    try:
        with _quiet():
            shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
            torch.onnx.export(wrapper, (example,), str(path), dynamo=True, dynamic_shapes=shapes, optimize=True,
                              external_data=False, verbose=False, **kw)
        exporter = "torch.export"
    except Exception as first:  # the exporters raise many types; each is reported, none is hidden
        log.info("torch.export could not capture the model (%s); trying the TorchScript-based exporter",
                 _first_line(first))
        try:
            with _quiet():
                torch.onnx.export(wrapper, (example,), str(path), dynamo=False,
                                  dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None,
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


def _write_torchscript(wrapper: Deployable, example: torch.Tensor, path: Path, *, meta: dict[str, str]) -> str:
    try:
        traced = _trace(wrapper, example)
    except Exception as e:
        raise _untraceable("torchscript", wrapper, example, e) from None
    with _quiet():
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps(meta)})
    return "torch.jit.trace"


def _untraceable(fmt: str, wrapper: Deployable, example: torch.Tensor, *errors: BaseException) -> TransferkitError:
    """The exporter's failure as one sentence: the operator, and whether the other format works."""
    op = next((o for o in map(_operator, errors) if o), "")
    what = f"its operator {op} has no {fmt} export" if op else f"{type(errors[0]).__name__}: {_first_line(errors[0])}"
    other = "torchscript" if fmt == "onnx" else "onnx"
    if other == "torchscript":
        try:
            _trace(wrapper, example)
            works = "--format torchscript exports it (checked against PyTorch like any export)"
        except Exception:
            works = "--format torchscript cannot trace it either"
    else:
        works = "try --format onnx"
    return TransferkitError(f"the model cannot be exported to {fmt} ({what}); {works}, or replace that operation "
                            "in the model")


# --- running and comparing ---------------------------------------------------------------------


def onnx_session(path: Path) -> Any:
    """An onnxruntime CPU session of `path`, or a clear error for a file that is not a whole ONNX model."""
    require("onnxruntime")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise TransferkitError(f"{path} is not a readable ONNX model ({_first_line(e)}): the "
                               "file is truncated or damaged; export it again with 'transferkit export RUN'") from None


def _fixed_batch(session: Any) -> int | None:
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) else None


def run_onnx(session: Any, images: torch.Tensor) -> torch.Tensor:
    """fp32 logits of uint8 model input, through onnxruntime (padding the last batch of a fixed-batch model)."""
    fixed = _fixed_batch(session)
    step = fixed or RUN_BATCH
    name = session.get_inputs()[0].name
    out = []
    for start in range(0, len(images), step):
        chunk = images[start:start + step].numpy()
        n = len(chunk)
        if fixed and n < fixed:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
        out.append(torch.from_numpy(session.run(None, {name: chunk})[0][:n].astype(np.float32)))
    return torch.cat(out)


@torch.no_grad()
def run_torch(module: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int | None = None) -> \
        torch.Tensor:
    """fp32 logits of uint8 model input through a PyTorch module (eager or TorchScript), on the CPU."""
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
    """int8 weights (and, static, activations calibrated on `calibration` images) with onnxruntime's tools."""
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
                    self.batches = iter([calibration[i:i + 16].numpy() for i in range(0, len(calibration), 16)])

                def get_next(self) -> dict[str, np.ndarray] | None:
                    x = next(self.batches, None)
                    return None if x is None else {"images": x}

            quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
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


def export_model(model: nn.Module, preprocessing: Preprocessing, classes: Sequence[str], out: str | Path,
                 check: torch.Tensor, *, fmt: Format = "onnx", batch: int | None = None, opset: int = DEFAULT_OPSET,
                 sha256: str | None = None, temperature: float = 1.0, source: str = "", measured_on: str = "",
                 quantize: str | None = None, calibration: torch.Tensor | None = None,
                 accuracy_on: tuple[torch.Tensor, torch.Tensor] | None = None, max_drop: float = 1.0,
                 ) -> dict[str, Any]:
    """Export `model` to `out` and keep it only if it agrees with PyTorch on `check` (uint8 model input,
    see as_input); returns the record export.json holds. `batch`: a fixed batch size (None: dynamic).
    `quantize="int8"` (ONNX): keep an int8 model, refused when its accuracy on `accuracy_on` (input,
    labels) drops by more than `max_drop` points from the fp32 model's."""
    out = Path(out)
    if fmt not in FORMATS:
        raise TransferkitError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require("onnx", "onnxscript", "onnxruntime")
    if quantize is not None and (quantize != "int8" or fmt != "onnx"):
        raise TransferkitError(f"--quantize {quantize}: only int8, and only for --format onnx")
    if batch is not None and batch < 1:
        raise TransferkitError(f"--batch {batch}: use a whole number of at least 1, or dynamic")
    if len(check) == 0:
        raise TransferkitError("the parity check needs at least one image")
    check_destination(out)
    started = time.perf_counter()
    # PyTorch side of the comparison: fp32, eval mode, on the CPU, whatever the model trained in.
    wrapper = Deployable(copy.deepcopy(model).cpu().float().eval(), preprocessing).eval()
    example = check[:batch] if batch else check[:2]
    if batch and len(example) < batch:
        example = torch.cat([example, example[-1:].expand(batch - len(example), -1, -1, -1)])
    meta = metadata(classes, preprocessing, sha256=sha256, temperature=temperature, source=source)
    reference = run_torch(wrapper, check, batch)
    record: dict[str, Any] = {"format": fmt, "file": out.name, "batch": batch or "dynamic",
                              "input": f"uint8 N x 3 x {preprocessing.image_size} x {preprocessing.image_size}",
                              "preprocessing": preprocessing.to_dict(), "metadata": meta}
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        work = Path(tmp) / ("model" + SUFFIX[fmt])
        if fmt == "onnx":
            record["exporter"] = _write_onnx(wrapper, example, work, dynamic=batch is None, opset=opset, meta=meta)
            record["opset"] = opset
            session = onnx_session(work)
            exported = run_onnx(session, check)
        else:
            record["exporter"] = _write_torchscript(wrapper, example, work, meta=meta)
            with _quiet():
                loaded = torch.jit.load(str(work)).eval()
            exported = run_torch(loaded, check, batch)
        figures = parity(reference, exported)
        passed = figures["top1_agreement"] == 1.0 and figures["max_abs_prob_diff"] <= MAX_PROB_DIFF
        record["parity"] = {**figures, "measured_on": measured_on, "against": "PyTorch fp32 on the CPU",
                            "limits": {"top1_agreement": 1.0, "max_abs_prob_diff": MAX_PROB_DIFF}, "passed": passed}
        log.info("parity %s vs PyTorch on %d images: top-1 agreement %.2f%%, max |softmax difference| %.2e",
                 fmt, figures["images"], 100 * figures["top1_agreement"], figures["max_abs_prob_diff"])
        if not passed:
            raise CheckFailed(
                f"the {fmt} export disagrees with PyTorch on {measured_on or 'the check images'}: top-1 agreement "
                f"{100 * figures['top1_agreement']:.2f}% (needs 100%), max |softmax difference| "
                f"{figures['max_abs_prob_diff']:.2e} (limit {MAX_PROB_DIFF:.0e}); nothing was written to {out}. "
                + ("Try --format onnx" if fmt == "torchscript" else "Try --format torchscript or another --opset"))
        if quantize:
            work = _int8(work, record, check, exported, calibration, accuracy_on, max_drop, out)
        kept = work.read_bytes()
        atomic_write(out, kept)
    record["sha256"] = hashlib.sha256(kept).hexdigest()
    record["bytes"] = len(kept)
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def _int8(fp32: Path, record: dict[str, Any], check: torch.Tensor, fp32_logits: torch.Tensor,
          calibration: torch.Tensor | None, accuracy_on: tuple[torch.Tensor, torch.Tensor] | None,
          max_drop: float, out: Path) -> Path:
    """Quantize the checked fp32 file: static (calibrated) and dynamic, keep the more accurate; refuse a drop."""
    if accuracy_on is None:
        raise TransferkitError("--quantize int8 needs labelled test images to measure the accuracy drop")
    images, labels = accuracy_on
    before = _accuracy(run_onnx(onnx_session(fp32), images), labels)
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
        except Exception as e:  # an operator onnxruntime cannot quantize this way: try the other way
            log.warning("%s int8 quantization failed (%s)", method, _first_line(e))
            continue
        tried[method] = {"path": path, "accuracy": after, "parity": parity(fp32_logits, run_onnx(session, check))}
        log.info("int8 %s: test accuracy %.2f%% (fp32 %.2f%%)", method, 100 * after, 100 * before)
    if not tried:
        raise CheckFailed(f"onnxruntime could not quantize this model to int8; nothing was written to {out}; "
                                "export it without --quantize")
    # Of the methods within --max-drop, the one that agrees most with the checked fp32 model (a small test split
    # ranks two close accuracies by chance); when none is within it, the most accurate, to report.
    within = [m for m in tried if 100 * (before - tried[m]["accuracy"]) <= max_drop]
    method = max(within, key=lambda m: tried[m]["parity"]["top1_agreement"]) if within else max(
        tried, key=lambda m: tried[m]["accuracy"])
    best = tried[method]
    drop = 100 * (before - best["accuracy"])
    record["quantization"] = {
        "type": "int8", "method": method,
        "calibration_images": len(calibration) if method == "static" and calibration is not None else 0,
        "test_images": len(labels), "accuracy_fp32": before, "accuracy_int8": best["accuracy"],
        "drop_points": round(drop, 3), "max_drop_points": max_drop,
        "tried": {m: {"accuracy_int8": t["accuracy"], "top1_agreement_vs_fp32": t["parity"]["top1_agreement"]}
                  for m, t in tried.items()},
        "parity_vs_fp32": best["parity"] | {"note": "int8 is gated on the accuracy drop, not on these limits"},
    }
    if drop > max_drop:
        raise CheckFailed(
            f"int8 ({method}) loses {drop:.2f} points of test accuracy ({100 * before:.2f}% -> "
            f"{100 * best['accuracy']:.2f}% on {len(labels)} images), more than --max-drop {max_drop:g}; nothing was "
            f"written to {out}. Export fp32 (without --quantize), or allow more with --max-drop")
    _copy_metadata(fp32, best["path"], {"quantization": f"int8 {method}"})
    return best["path"]


# --- a run folder ------------------------------------------------------------------------------


def _images(split: Split, pre: Preprocessing, count: int | None = None, seed: int = 0) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """(uint8 model input, labels) of a class-balanced, seeded subset of `count` images of a split (all: None)."""
    if count is not None and count < len(split):
        split = split.subset(stratified_subset(split.labels, count, seed)[:count])
    xs, ys = [], []
    for images, labels in batches(split, 64):
        xs.append(as_input(pre, images))
        ys.append(labels)
    return torch.cat(xs), torch.cat(ys)


def export_predictor(predictor: Any, out: str | Path, images: Sequence[Any], *, fmt: Format = "onnx",
                     **options: Any) -> dict[str, Any]:
    """Export a Predictor (e.g. Predictor.from_pretrained) checked on `images` (paths, PIL images, arrays)."""
    from .predict import stored

    pre = predictor.preprocessing
    check = torch.cat([as_input(pre, stored(pre, im)[None]) for im in images])
    return export_model(predictor.model, pre, predictor.classes, out, check, fmt=fmt,
                        temperature=predictor.temperature, measured_on=f"{len(check)} images given", **options)


def default_out(run_dir: Path, fmt: str, quantize: str | None = None) -> Path:
    """RUN/model.onnx, RUN/model.pt, RUN/model.int8.onnx."""
    return Path(run_dir) / (f"model.{quantize}{SUFFIX[fmt]}" if quantize else f"model{SUFFIX[fmt]}")


def export_run(run_dir: str | Path, formats: Sequence[str] = ("onnx",), *, out: str | Path | None = None,
               batch: int | None = None, opset: int = DEFAULT_OPSET, check_images: int = 256,
               data: str | None = None, data_dir: str | None = None, quantize: str | None = None,
               max_drop: float = 1.0, workers: int = 2) -> list[dict[str, Any]]:
    """Export a run folder to each format (checked on its held-out images, or `data`'s) and record each
    export in export.json beside the file; returns the records."""
    from .predict import Predictor, split_to_score

    run_dir = Path(run_dir)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise TransferkitError(f"unknown format '{unknown[0]}'; choose onnx, torchscript or all")
    if check_images < 1:
        raise TransferkitError(f"--check-images {check_images}: the parity check needs at least 1 image")
    if quantize is not None and list(formats) != ["onnx"]:
        raise TransferkitError("--quantize int8 is for ONNX only; use --format onnx")
    card = read_card(run_dir)
    if "onnx" in formats:
        require("onnx", "onnxscript", "onnxruntime")
    targets = {f: _target(run_dir, f, out, len(formats) > 1, quantize) for f in formats}
    for t in targets.values():
        check_destination(t)
    pred = Predictor.from_run(run_dir, device="cpu")  # checks model.safetensors against its sha256
    pre = pred.preprocessing
    source = data or card.data
    if not source:
        raise TransferkitError(f"{run_dir}/model.json records no data set; pass --data DIR with images of its "
                               "classes for the parity check")
    own = data is None
    if own and not Path(source).expanduser().exists() and not _named(source):
        raise TransferkitError(f"the run's data {source} (recorded in {run_dir}/model.json) is missing; pass "
                               "--data DIR with images of its classes for the parity check")
    held, src, _ = split_to_score(run_dir, source, None, pre, own=own, data_dir=data_dir, workers=workers,
                                   same_pre=True)
    check, _ = _images(held, pre, check_images)
    measured_on = f"{len(check)} images of the {held.name} split of {source}"
    calibration = accuracy_on = None
    if quantize:
        images, labels = _images(held, pre)
        if sorted(src.classes) != sorted(pred.classes):
            raise TransferkitError(f"the classes of {source} are not the run's; --quantize measures accuracy on "
                                   "data with the run's classes")
        accuracy_on = (images, torch.tensor([pred.classes.index(c) for c in src.classes])[labels])
        train, _, _ = split_to_score(run_dir, source, "train", pre, own=own, data_dir=data_dir, workers=workers,
                                      same_pre=True)
        calibration, _ = _images(train, pre, 128, seed=1)
    records = []
    for fmt, target in targets.items():
        rec = export_model(pred.model, pre, pred.classes, target, check, fmt=fmt, batch=batch, opset=opset,
                           sha256=card.sha256, temperature=pred.temperature, source=f"transferkit run {run_dir.name} "
                           f"({card.arch}, trained on {card.data})", measured_on=measured_on, quantize=quantize,
                           calibration=calibration, accuracy_on=accuracy_on, max_drop=max_drop)
        rec["run"], rec["path"] = str(run_dir), str(target)
        _record(target, rec)
        records.append(rec)
    return records


def _named(data: str) -> bool:
    from .data.sources import is_named

    return is_named(data)


def _target(run_dir: Path, fmt: str, out: str | Path | None, several: bool, quantize: str | None) -> Path:
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


def _predictor_base() -> type:
    from .predict import Predictor

    return Predictor


class OnnxPredictor(_predictor_base()):  # type: ignore[misc]
    """A transferkit ONNX file run by onnxruntime, with the Predictor's answers (predict, ...).

    Only the model input (the graph's uint8 images) and the forward pass are its own: reading and
    resizing files (by the Preprocessing the file holds), --tta and top-k are the Predictor's.
    """

    def __init__(self, path: str | Path, *, tta: bool = False) -> None:  # no super().__init__: no torch model
        path = Path(path)
        if not path.is_file():
            raise TransferkitError(f"no such ONNX file: {path}")
        self.session = onnx_session(path)
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        if "classes" not in meta or "image_size" not in meta:
            raise TransferkitError(f"{path} holds no transferkit metadata (class names, input size, preprocessing); "
                                   "predict with a file written by 'transferkit export RUN', or pass the run folder")
        try:
            self.classes = list(json.loads(meta["classes"]))
            self.preprocessing = preprocessing_of(meta)
            self.temperature = float(meta.get("temperature", 1.0))
        except (ValueError, TypeError, KeyError) as e:
            raise TransferkitError(f"{path}: its transferkit metadata is damaged ({e}); export the run again") from None
        self.metadata = meta
        self.model = None
        self.device = torch.device("cpu")
        self.precision = "fp32"
        self.tta = tta

    def _input(self, stored: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([as_input(self.preprocessing, t[None]) for t in stored])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_onnx(self.session, x.contiguous())
