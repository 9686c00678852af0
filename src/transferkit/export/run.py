"""Export a run folder or a Predictor, checked on held-out images; export.json records each export.

A run folder is checked on its own held-out split (or `--data`'s), and --quantize int8 measures
the accuracy drop on all of it, calibrating on the run's training images; the run's ModelCard
travels in the file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import runfiles
from ..checkpoint import ModelCard, read_card
from ..data.preprocess import Preprocessing
from ..data.sources import DataSource, is_named
from ..data.splits import Split, stratified_subset
from ..data.transforms import batches
from ..errors import TransferkitError
from ..evaluate import held_out_record, split_to_score
from ..predict import Predictor, stored
from .compare import agreement
from .file_metadata import metadata, record
from .model import export_checked
from .request import (
    DEFAULT_OPSET,
    SUFFIX,
    Format,
    Int8,
    Target,
    check_quantizable,
    check_run_request,
    destinations,
    require,
)
from .runtime import as_input

log = logging.getLogger(__name__)


def _images(split: Split, pre: Preprocessing, count: int | None = None,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 model input, labels) of a class-balanced, seeded subset of `count` images of a split
    (None or more than it holds: all)."""
    if count is not None and count < len(split):
        picked = stratified_subset(split.labels, count, seed)[:count]
        if len(picked) < count:  # each class's share was rounded down: top up, in a seeded order
            taken = set(picked.tolist())
            order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
            rest = [i for i in order.tolist() if i not in taken][:count - len(picked)]
            picked = torch.cat([picked, torch.tensor(rest, dtype=picked.dtype)])
        split = split.subset(picked)
    xs, ys = [], []
    for images, labels in batches(split, 64):
        xs.append(as_input(pre, images))
        ys.append(labels)
    return torch.cat(xs), torch.cat(ys)


def export_predictor(predictor: Predictor, out: str | Path, images: Sequence[Any], *,
                     fmt: Format = "onnx", batch: int | None = None, opset: int = DEFAULT_OPSET,
                     int8: Int8 | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Export a Predictor (e.g. Predictor.from_pretrained) checked on `images` (paths, PIL images,
    arrays); a run's Predictor (from_run) writes its ModelCard into the file. `overwrite`: replace
    an existing file at `out` (never a file of a run folder)."""
    pre = predictor.preprocessing
    check = torch.cat([as_input(pre, stored(pre, im)[None]) for im in images])
    meta = metadata(predictor.classes, pre, temperature=predictor.temperature,
                    card=predictor.card, task=predictor.task.name,
                    thresholds=predictor.thresholds)
    return export_checked(predictor.model, pre, meta,
                          Target(Path(out), fmt, batch, opset, overwrite), check,
                          measured_on=f"{len(check)} images given", int8=int8)


def default_out(run_dir: Path, fmt: str, quantize: str | None = None) -> Path:
    """RUN/model.onnx, RUN/model.pt, RUN/model.int8.onnx."""
    name = f"model.{quantize}{SUFFIX[fmt]}" if quantize else f"model{SUFFIX[fmt]}"
    return Path(run_dir) / name


def export_run(run_dir: str | Path, formats: Sequence[str] = ("onnx",), *,
               out: str | Path | None = None, batch: int | None = None, opset: int | None = None,
               check_images: int = 256, data: str | None = None, data_dir: str | None = None,
               quantize: str | None = None, max_drop: float = 1.0, workers: int = 2,
               overwrite: bool = False) -> list[dict[str, Any]]:
    """Export a run folder to each format, checked on its held-out images (or `data`'s).

    Each export is recorded in export.json beside its file; returns the records. `overwrite`:
    replace existing files at the destinations (never a file of a run folder)."""
    run_dir = Path(run_dir)
    check_run_request(formats, check_images, quantize, opset)
    opset = DEFAULT_OPSET if opset is None else opset
    card = read_card(run_dir)
    check_quantizable(card.task, quantize)
    if "onnx" in formats:
        require("onnx", "onnxscript", "onnxruntime")
    paths = [_target(run_dir, f, out, len(formats) > 1, quantize) for f in formats]
    targets = [Target(path, f, batch, opset, overwrite) for path, f in zip(paths, formats)]
    with destinations(paths, overwrite):
        # One reading of model.json; model.safetensors is checked against its sha256.
        pred = Predictor.from_run(run_dir, device="cpu", card=card)
        pre = pred.preprocessing
        source, own = _data_to_check(run_dir, card, data)
        scored = dict(record=held_out_record(run_dir, source) if own else None,
                      data_dir=data_dir, workers=workers, same_pre=True)
        held, src, _ = split_to_score(run_dir, source, None, pre, **scored)
        check, _ = _images(held, pre, check_images)
        split = f"the {held.name} split of {source}"
        int8 = None
        if quantize:
            int8 = Int8(_labelled(held, src, pred.classes, pre, source),
                        _calibration(run_dir, card, source, pre, scored), max_drop, split)
        meta = metadata(pred.classes, pre, temperature=pred.temperature, card=card,
                        source=f"transferkit run {run_dir.name} ({card.arch}, trained on "
                               f"{card.data})")
        records = []
        for target in targets:
            rec = export_checked(pred.model, pre, meta, target, check, int8=int8,
                                 measured_on=_measured_on(len(check), check_images, split))
            rec["run"], rec["path"] = str(run_dir), str(target.path)
            record(target.path, rec)
            records.append(rec)
    return records


def _measured_on(count: int, asked: int, split: str) -> str:
    """What the parity check ran on, and that it was fewer images than --check-images asked."""
    if count < asked:
        return (f"all {count} images of {split} (fewer than the {asked} that --check-images "
                "asked for)")
    return f"{count} images of {split}"


def summary(rec: dict[str, Any]) -> list[str]:
    """What `transferkit export` prints of one export: its file, the parity figures, int8's."""
    p = rec["parity"]
    what, share = agreement(p)
    prob = "sigmoid" if p.get("task") == "multilabel" else "softmax"
    edge = p.get("decisions_at_threshold")
    lines = [f"{rec['format']}: {rec['path']}  ({rec['bytes'] / 1e6:.1f} MB, {rec['exporter']}"
             + (f", opset {rec['opset']})" if "opset" in rec else ")"),
             f"  parity with PyTorch on {p['measured_on']}: {what} {100 * share:.2f}%, max "
             f"|{prob} difference| {p['max_abs_prob_diff']:.2e}"
             + (f" ({edge} label decision(s) differ, each on an image scored at the label's "
                "threshold)" if edge else "")]
    q = rec.get("quantization")
    if q:
        change = round(100 * (q["accuracy_int8"] - q["accuracy_fp32"]), 2) + 0.0  # no "-0.00"
        lines.append(f"  int8 ({q['method']}): accuracy on {q['measured_on']} "
                     f"{100 * q['accuracy_fp32']:.2f}% -> {100 * q['accuracy_int8']:.2f}% "
                     f"({q['images']} images, {change:+.2f} points); top-1 agreement with fp32 "
                     f"{100 * q['parity_vs_fp32']['top1_agreement']:.2f}%")
    return lines


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


def _calibration(run_dir: Path, card: ModelCard, source: str, pre: Preprocessing,
                 scored: dict[str, Any]) -> torch.Tensor | None:
    """128 of the run's training images (class-balanced, seeded): what static int8 calibrates on;
    --data's training images where the run's data is not on this machine; None (dynamic only,
    said) where neither is."""
    own = card.data and (is_named(card.data) or Path(card.data).expanduser().exists())
    data = card.data if own else source
    if own and data != source:
        scored = dict(scored, record=held_out_record(run_dir, data))
    try:
        train, _, _ = split_to_score(run_dir, data, "train", pre, **scored)
    except TransferkitError:
        log.warning("static int8 calibrates on training images: the run's data %s is not on this "
                    "machine and %s has no train split, so only dynamic int8 is tried",
                    card.data or "(not recorded)", data)
        return None
    return _images(train, pre, 128, seed=1)[0]


def _target(run_dir: Path, fmt: str, out: str | Path | None, several: bool,
            quantize: str | None) -> Path:
    """Where a format's file goes: --out (its suffix per format when there are several), else the
    run folder."""
    if out is None:
        return default_out(run_dir, fmt, quantize)
    out = Path(out)
    return out.with_suffix(SUFFIX[fmt]) if several else out
