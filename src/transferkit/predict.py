"""Predictor.from_run(dir) -> top-k on files, folders, PIL images; evaluate a run on any data."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from . import runfiles
from .checkpoint import ModelCard, load_model_state, read_card
from .data import heldout
from .data.folders import folder_layout
from .data.images import UnreadableImage, pil_to_tensor, to_rgb, walk_images
from .data.preprocess import Preprocessing, resolve_preprocessing
from .data.sources import DataSource, Split, check_data_arg, check_leakage, is_named, load_source
from .errors import TransferkitError
from .models import check_model_name, check_side, create_backbone, rebuild
from .report import calibration, classification_metrics, measured_on, write_report
from .report.error_analysis import write_errors
from .runtime import pick_device, resolve_precision
from .training.engine import evaluate, infer

log = logging.getLogger(__name__)


class Predictor:
    """A trained classifier with its preprocessing; call predict() on images or paths."""

    card: ModelCard | None = None  # a run's model.json (from_run); export writes it into its files

    def __init__(self, model: torch.nn.Module, classes: Sequence[str], preprocessing: Preprocessing,
                 *, device: str = "auto", precision: str = "auto", tta: bool = False,
                 temperature: float = 1.0) -> None:
        self.device = pick_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.tta = tta  # test-time augmentation: average over each image and its mirror image
        # probabilities are softmax(logits / temperature) (train --calibrate)
        self.temperature = temperature

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", *, image_size: int | None = None,
                 tta: bool = False, precision: str | None = None,
                 card: ModelCard | None = None) -> Predictor:
        """Load a run folder written by `transferkit train` (safetensors + model.json).

        `image_size`: feed the model this input size instead of the trained one (the resize before
        the centre crop scales with it). A model trained on random-resized crops sees objects larger
        than they are at test time, so a slightly larger test size often scores higher ("FixRes").
        `tta`: average the prediction of each image and its mirror image.
        `precision`: auto, bf16 or fp32; None: fp32 for a run trained in fp32 (eval then reproduces
        its report), else auto (bf16 where the hardware runs it fast). fp32 gives what its ONNX
        export gives. `card`: the run's model.json, where the caller has read it already.
        """
        run_dir = Path(run_dir)
        card = card if card is not None else read_card(run_dir)
        pred = cls(_rebuild(run_dir, card), card.classes, _at_size(card, image_size), device=device,
                   tta=tta, temperature=card.temperature,
                   # A run trained in fp32 is evaluated in fp32, so eval reproduces its report.
                   precision=precision or ("fp32" if card.precision == "fp32" else "auto"))
        pred.card = card
        return pred

    @classmethod
    def from_pretrained(cls, arch: str, weights: str = "imagenet",
                        device: str = "auto") -> Predictor:
        """The backbone with its own ImageNet head, e.g. to check weights and preprocessing."""
        bb = create_backbone(arch, weights)
        if not bb.categories:
            raise TransferkitError(f"weights '{weights}' carry no class names; use a torchvision "
                                   "weights name")
        return cls(bb.model, bb.categories, bb.preprocessing, device=device)

    @torch.no_grad()
    def predict(
        self, images: Iterable[str | Path | Image.Image | torch.Tensor | np.ndarray] | str | Path,
        topk: int = 5, batch_size: int = 32,
    ) -> list[list[tuple[str, float]]]:
        """Top-k (class, probability) for each image.

        Images are paths, PIL images, uint8 tensors (C, H, W) or arrays (H, W, C); float ones with
        values in [0, 1]. One path, one PIL image, one 2-D array or tensor and one 3-D one with 1 or
        3 channels (first or last) is one image; other arrays are a batch along their first axis
        (N, H, W, C), (N, C, H, W) or (N, H, W)."""
        if _one_image(images):
            images = [images]
        if batch_size < 1:
            raise TransferkitError(f"batch_size {batch_size}: predict at least one image at a time")
        k = max(1, min(topk, len(self.classes)))
        results: list[list[tuple[str, float]]] = []
        # one batch at a time, as stored (at most the input side), on the CPU
        batch: list[torch.Tensor] = []
        for item in images:
            batch.append(stored(self.preprocessing, item))
            if len(batch) == batch_size:
                results += self._top(batch, k)
                batch = []
        return results + (self._top(batch, k) if batch else [])

    @torch.no_grad()
    def _top(self, stored: list[torch.Tensor], k: int) -> list[list[tuple[str, float]]]:
        """Top-k of a batch of stored images: as model input, the way eval feeds them (with --tta,
        the mirror image averaged in as eval does)."""
        logits = infer(self._forward, self._input(stored), device=self.device,
                       precision=self.precision, tta=self.tta)
        return top_k(logits, self.classes, k, self.temperature)

    def _input(self, stored: list[torch.Tensor]) -> torch.Tensor:
        """Stored images as model input on the device (ONNX predictor: the graph's uint8 input)."""
        return torch.cat([self.preprocessing.to_input(t[None].to(self.device)) for t in stored])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of model input (the ONNX predictor: run by onnxruntime)."""
        return self.model(x)

    def predict_paths(
        self, paths: Sequence[str | Path], topk: int = 5, batch_size: int = 32
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """Predict files and folders (searched recursively). Returns (results, [(path, reason)])."""
        files, errors = expand_paths(paths)
        results = []
        for path, top in self.predict_files(files, topk=topk, batch_size=batch_size):
            if isinstance(top, str):
                errors.append((str(path), top))
            else:
                results.append({"file": str(path),
                                "top": [{"class": c, "prob": p} for c, p in top]})
        return results, errors

    def predict_files(
        self, files: Iterable[str | Path], topk: int = 5, batch_size: int = 32
    ) -> Iterator[tuple[Path, list[tuple[str, float]] | str]]:
        """(path, top-k) for each file in order, or (path, why it was skipped), a batch at a time.

        Each image is decoded, stored at the input side and its full-size pixels dropped before the
        next is read, so memory holds one photo and one batch, whatever the number of files.
        """
        if batch_size < 1:
            raise TransferkitError(f"batch_size {batch_size}: predict at least one image at a time")
        k = max(1, min(topk, len(self.classes)))
        batch: list[tuple[Path, torch.Tensor | str]] = []
        images = 0
        for f in map(Path, files):
            try:
                batch.append((f, self.preprocessing.read(f)))
                images += 1
            except UnreadableImage as e:
                batch.append((f, str(e)))
            if images == batch_size:
                yield from self._answers(batch, k)
                batch, images = [], 0
        yield from self._answers(batch, k)

    def _answers(self, batch: list[tuple[Path, torch.Tensor | str]],
                 k: int) -> Iterator[tuple[Path, list[tuple[str, float]] | str]]:
        stored = [t for _, t in batch if not isinstance(t, str)]
        tops = iter(self._top(stored, k) if stored else [])
        for path, t in batch:
            yield path, t if isinstance(t, str) else next(tops)


def top_k(logits: torch.Tensor, classes: Sequence[str], k: int,
          temperature: float = 1.0) -> list[list[tuple[str, float]]]:
    """The k most probable (class, probability) of each row of logits; probabilities are
    softmax(logits / temperature)."""
    p, idx = (logits.float() / temperature).softmax(1).cpu().topk(k, dim=1)
    return [[(classes[i], v) for v, i in zip(row_p, row_i)]
            for row_p, row_i in zip(p.tolist(), idx.tolist())]


def _one_image(images: Any) -> bool:
    if isinstance(images, (str, Path, Image.Image)):
        return True
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim != 3:
            return images.ndim == 2
        return images.shape[0] in (1, 3) or images.shape[-1] in (1, 3)
    return False


def stored(pre: Preprocessing,
           item: str | Path | Image.Image | torch.Tensor | np.ndarray) -> torch.Tensor:
    """An image file or an image in memory as `pre` stores it (files: `Preprocessing.read`)."""
    return pre.read(item) if isinstance(item, (str, Path)) else pre.store(_as_uint8(item))


def _as_uint8(item: Image.Image | torch.Tensor | np.ndarray) -> torch.Tensor:
    """An image in memory as a uint8 tensor (C, H, W) with C 1 or 3, or a clear error."""
    if isinstance(item, Image.Image):  # turned upright as its EXIF orientation says, as files are
        return pil_to_tensor(to_rgb(ImageOps.exif_transpose(item)))
    channels_last = isinstance(item, np.ndarray)
    if channels_last:
        item = torch.from_numpy(np.ascontiguousarray(item))
    if not isinstance(item, torch.Tensor):
        raise TransferkitError(f"cannot predict a {type(item).__name__}: pass file paths, PIL "
                               "images, uint8 tensors (C, H, W) or arrays (H, W, C)")
    t = item[None] if item.ndim == 2 else item
    if t.ndim == 3 and (channels_last or t.shape[0] not in (1, 3)) and t.shape[-1] in (1, 3):
        t = t.permute(2, 0, 1)
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise TransferkitError(f"an image tensor needs 1 or 3 channels, (C, H, W) or (H, W, C); "
                               f"got shape {tuple(item.shape)} (convert RGBA images to RGB first)")
    if t.dtype == torch.uint8:
        return t
    if t.is_floating_point() and (t.min() < 0 or t.max() > 1):
        raise TransferkitError(f"a float image tensor holds values in [0, 1], this one "
                               f"{t.min():.3g}..{t.max():.3g}; divide by 255, or pass uint8")
    scale = 255 if t.is_floating_point() else 1
    if not t.is_floating_point() and (t.min() < 0 or t.max() > 255):
        raise TransferkitError(f"an integer image tensor holds values in 0..255, this one "
                               f"{t.min()}..{t.max()}")
    return (t.double() * scale).round().to(torch.uint8)


def _at_size(card: ModelCard, image_size: int | None) -> Preprocessing:
    """The run's preprocessing, or the same at another input side (same crop ratio)."""
    pre = card.preprocessing
    if image_size is None or image_size == pre.image_size:
        return pre
    if not 16 <= image_size <= 1024:
        raise TransferkitError(f"--image-size {image_size}: use a side between 16 and 1024 pixels")
    check_side(card.arch, image_size, pre.image_size)
    return resolve_preprocessing(image_size=image_size, weights=pre)


def _rebuild(run_dir: Path, card: ModelCard) -> torch.nn.Module:
    """The run's model: the card's architecture with model.safetensors (checked by its sha256)."""
    state = load_model_state(run_dir, card)
    try:
        check_model_name(card.arch)
        model = rebuild(card.arch, card.head, card.num_classes, card.build_kwargs)
        model.load_state_dict(state)
    except (TransferkitError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        raise TransferkitError(
            f"{run_dir / runfiles.CARD} does not describe {run_dir / runfiles.MODEL} (arch "
            f"{card.arch!r}, head {card.head!r}, {card.num_classes} classes: "
            f"{str(e).splitlines()[0][:200]}); was {runfiles.CARD} edited? Restore it from the "
            "run, or retrain"
        ) from None
    return model


def expand_paths(paths: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files as given, folders expanded to their image files; missing paths become errors."""
    files: list[Path] = []
    errors: list[tuple[str, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found, left_out = walk_images(p)
            errors += [(item, "left out: reached again through a link") for item in left_out]
            if not found:
                errors.append((str(p), "folder holds no image files"))
            files += found
        elif p.is_file():
            files.append(p)
        elif p.exists():
            errors.append((str(p), "not a file or folder (a device, pipe or socket)"))
        else:
            errors.append((str(p), "no such file or folder"))
    return files, errors


def evaluate_run(
    run_dir: str | Path, data: str | None = None, *, data_dir: str | None = None,
    split: str | None = None, batch_size: int = 128, device: str = "auto", workers: int = 2,
    image_size: int | None = None, tta: bool = False, report_dir: str | Path | None = None,
) -> tuple[dict[str, Any], str, Path | None]:
    """Evaluate a run on a data set with the same classes; writes eval-<data>-<split>.md in the
    run (or `report_dir`) and returns (metrics, what they were measured on, the report or None if
    unwritable).

    On the run's own data (the default) it scores the split the run held out: test if the data has
    one, else the validation split exactly as the run carved it from train (split.json);
    `split="train"` scores the images that trained the model, and says so.
    """
    run_dir = Path(run_dir)
    if batch_size < 1:
        raise TransferkitError(f"batch_size {batch_size}: evaluate at least 1 image per batch")
    card = read_card(run_dir)
    if not (data or card.data):
        raise TransferkitError(f"pass --data: {run_dir / runfiles.CARD} does not record the data "
                               "set it was trained on")
    if not data and not is_named(card.data) and not Path(card.data).exists():
        raise TransferkitError(f"the run's data folder {card.data} (recorded in "
                               f"{run_dir / runfiles.CARD}) is missing; if it moved, pass its new "
                               "place with --data NEWPATH")
    data = data or card.data
    pred = Predictor.from_run(run_dir, device=device, image_size=image_size, tta=tta, card=card)
    check_data_arg(data)
    part, src, note = _split_of(run_dir, card, data, split, pred.preprocessing, data_dir=data_dir,
                                workers=workers)
    labels = _labels(data, src, part, pred.classes)
    logits, _ = evaluate(pred.model, part, pred.preprocessing.to_input, batch_size=batch_size,
                         device=pred.device, precision=pred.precision, tta=tta, workers=workers)
    metrics = classification_metrics(logits, labels, pred.classes)
    metrics["calibration"] = calibration.summary(logits, labels, pred.temperature)
    said = measured_on(part, data, pred.preprocessing.image_size, tta=tta, note=note)
    if src.skipped:
        log.warning("%d unreadable files skipped", len(src.skipped))
    other_size = image_size if image_size and image_size != card.preprocessing.image_size else None
    report = _write_eval_report(
        Path(report_dir) if report_dir is not None else run_dir, metrics,
        title=f"{run_dir.name} evaluated on {data}", measured_on=said, classes=pred.classes,
        setup={"run": str(run_dir)}, name=_eval_name(data, part.name, other_size, tta),
        analysed=(logits / pred.temperature, labels, part, pred.classes, pred.preprocessing))
    return metrics, said, report


def _split_of(run_dir: Path, card: ModelCard, data: str, split: str | None, pre: Preprocessing, *,
              data_dir: str | None, workers: int) -> tuple[Split, DataSource, str]:
    """What eval scores: on the run's own data (or that data moved to another folder) the split it
    held out, else the split `data` lays out; with its source and a note for what it measured."""
    own = _same_data(data, card.data)
    # The folder it trained on is gone and another is named: most likely the same data, moved
    # (checked below).
    moved = not own and bool(card.data) and not is_named(card.data) and not Path(
        card.data).expanduser().exists()
    record = held_out_record(run_dir, data) if own or moved else None
    score = dict(data_dir=data_dir, workers=workers, same_pre=pre == card.preprocessing)
    try:
        return split_to_score(run_dir, data, split, pre, record=record, **score)
    except heldout.SplitChanged:
        if not moved:
            raise
        log.warning("%s is not the data %s trained on, moved (its held-out split differs from "
                    "%s): evaluating it as other data", data, run_dir, runfiles.SPLIT)
        return split_to_score(run_dir, data, split, pre, record=None, **score)


def _labels(data: str, src: DataSource, part: Split, classes: list[str]) -> torch.Tensor:
    """The model's class index of each image of `part`; data with other classes is refused."""
    if sorted(src.classes) != sorted(classes):
        missing = sorted(set(classes) - set(src.classes))
        extra = sorted(set(src.classes) - set(classes))
        raise TransferkitError(
            f"classes of {data} do not match the run's: missing {missing or 'none'}, "
            f"not known to the model {extra or 'none'}; evaluate on data with the classes "
            f"{', '.join(classes)}"
        )
    return torch.tensor([classes.index(c) for c in src.classes])[part.labels]


def _eval_name(data: str, split: str, image_size: int | None, tta: bool) -> str:
    """eval-<data>-<split>[-<size>px][-tta]: the report's file name."""
    size = f"-{image_size}px" if image_size else ""
    return f"eval-{Path(data).name or 'data'}-{split}{size}" + ("-tta" if tta else "")


def _same_data(data: str, trained_on: str) -> bool:
    """Whether `data` names the data set the run trained on (a named set, or the same folder)."""
    if not trained_on:
        return False
    if is_named(data) or is_named(trained_on):
        return data.lower() == trained_on.lower()
    try:
        return Path(data).expanduser().resolve() == Path(trained_on).expanduser().resolve()
    except OSError:
        return False


def held_out_record(run_dir: Path, data: str) -> dict[str, Any] | None:
    """What the run held out of its data: split.json, or for a run without one the rule its
    config.yaml gives, unchecked (None when neither says)."""
    record = heldout.read_split_record(run_dir)
    return _record_from_config(run_dir, data) if record is None else record


def split_to_score(run_dir: Path, data: str, split: str | None, pre: Preprocessing, *,
                   record: dict[str, Any] | None, data_dir: str | None, workers: int,
                   same_pre: bool) -> tuple[Split, DataSource, str]:
    """The split to evaluate, its source, and a note for what it was measured on. `record`: what
    the run held out of `data` (held_out_record), None for other data."""
    if split is None:
        split = record["evaluate"] if record is not None else _first_split(data)
    carved = record is not None and float(record.get("val_split") or 0) > 0 and split in (
        "train", "val")
    if carved:
        src, kept, held = heldout.carve(data, record, pre, data_dir=data_dir, workers=workers)
        part = held if split == "val" else kept
    else:
        src, part = _load_split(data, split, record, pre, data_dir=data_dir, workers=workers)
    if record is None:
        return part, src, ""
    if record.get("unchecked"):
        log.warning("%s records no held-out split (no usable %s; earlier transferkit versions "
                    "wrote none): evaluating the %s split of %s, %s", run_dir, runfiles.SPLIT,
                    split, data, f"carved again by {runfiles.CONFIG}'s val_split and seed; it "
                    "could not be checked against the run's" if carved
                    else "as the data lays it out")
    else:
        heldout.check_same(split, part, record.get(split), len(src.classes),
                           same_pixels=same_pre, run_dir=run_dir, data=data)
    return part, src, _note(split, record, carved)


def _first_split(data: str) -> str:
    """test, else val, else train: the first split the data lays out."""
    layout = {"test": None} if is_named(data) else folder_layout(Path(data).expanduser())
    return next(s for s in ("test", "val", "train") if s in layout)


def _load_split(data: str, split: str, record: dict[str, Any] | None, pre: Preprocessing, *,
                data_dir: str | None, workers: int) -> tuple[DataSource, Split]:
    """A split the data lays out (not carved), without the copies of train the run dropped."""
    max_train = record.get("max_train_images") if record is not None else None
    dedupe = bool(record and record.get("dedupe")) and split != "train"
    src = load_source(data, preprocessing=pre, data_dir=data_dir, workers=workers,
                      splits=(split, "train") if dedupe else (split,), max_train_images=max_train,
                      seed=int(record.get("seed", 0)) if record else 0)
    if dedupe:
        check_leakage(src, dedupe=True)
    part = getattr(src, split)
    if part is None:
        raise TransferkitError(f"{data} has no '{split}' split; choose --split train, val or test")
    return src, part


def _note(split: str, record: dict[str, Any], carved: bool) -> str:
    """What a reader of the figures should know about the run's own split they measure."""
    again = f", re-carved from {runfiles.CONFIG} and unchecked" if record.get("unchecked") else ""
    if split == "val" and carved:
        return (f"held out of train by the run: {100 * float(record['val_split']):g}% of each "
                f"class, seed {record.get('seed', 0)}{again}; it chose its epoch on them")
    if split == "val":
        return "the run chose its epoch on them"
    if split == "train":
        return ("the run's training images: these images trained the model, so they overstate its "
                "accuracy")
    return ""


def _record_from_config(run_dir: Path, data: str) -> dict[str, Any] | None:
    """For a run without split.json: the rule its config.yaml gives (val_split, seed,
    max_train_images), unchecked."""
    from .config import TrainConfig

    try:
        cfg = TrainConfig.from_yaml(run_dir / runfiles.CONFIG)
    except (TransferkitError, OSError, ValueError, TypeError):
        return None
    layout = {"train": None, "test": None} if is_named(data) else folder_layout(
        Path(data).expanduser())
    carved = heldout.val_carved(data) and cfg.val_split > 0
    return {"unchecked": True, "evaluate": "test" if "test" in layout else "val", "seed": cfg.seed,
            "val_split": cfg.val_split if carved else 0.0,
            "max_train_images": cfg.max_train_images, "dedupe": getattr(cfg, "dedupe", False)}


def _write_eval_report(where: Path, metrics: dict[str, Any], analysed: tuple[Any, ...],
                       **report: Any) -> Path | None:
    """The report and its errors in `where` (`analysed`: logits, labels, split, classes,
    preprocessing); if they cannot be written there, one line that says so (the figures stand)."""
    try:
        where.mkdir(parents=True, exist_ok=True)
        errors = write_errors(where, report["name"], *analysed, title=report["title"])
        return write_report(where, metrics, errors=errors, **report)
    except (OSError, TransferkitError) as e:
        why = getattr(e, "strerror", None) or str(e).split(";")[0]
        log.warning("could not write the report into %s (%s); --report-dir DIR writes it elsewhere",
                    where, why)
        return None
