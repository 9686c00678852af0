"""Predictor: top-k of a run folder on image files, folders, PIL images and arrays; a multi-label
run's answer is every label above its threshold (LabelSet)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

from . import runfiles
from .arguments import checked
from .checkpoint import ModelCard, load_model_state, read_card
from .data.images import UnreadableImage, pil_to_tensor, to_rgb, walk_images
from .data.preprocess import Preprocessing, resolve_preprocessing
from .errors import TransferkitError
from .models import check_model_name, check_side, create_backbone, rebuild
from .runtime import kept_generators, pick_device, resolve_precision
from .task import Task, task_of
from .training.engine import infer

log = logging.getLogger(__name__)

ImageLike = str | Path | Image.Image | torch.Tensor | np.ndarray


class LabelSet(NamedTuple):
    """A multi-label model's answer for one image: `labels`, every (label, probability) whose
    probability (its sigmoid) is >= the label's threshold, most probable first (empty: no label
    reached its threshold); `top`, the k most probable (label, probability), whatever the
    thresholds."""

    labels: list[tuple[str, float]]
    top: list[tuple[str, float]]


Answer = list[tuple[str, float]] | LabelSet  # one image's: top-k (one class per image) or LabelSet


class Predictor:
    """A trained classifier with its preprocessing; call predict() on images or paths.

    `task`: "single" (one class per image: top-k of the softmax) or "multilabel" (a sigmoid per
    label: each answer a LabelSet, a label answered when its probability is >= its `thresholds`
    entry; None: 0.5 each)."""

    card: ModelCard | None = None  # a run's model.json (from_run); export writes it into its files

    @checked
    def __init__(self, model: torch.nn.Module, classes: Sequence[str], preprocessing: Preprocessing,
                 *, device: str | torch.device = "auto", precision: str = "auto", tta: bool = False,
                 temperature: float = 1.0, task: Literal["single", "multilabel"] = "single",
                 thresholds: Sequence[float] | None = None) -> None:
        self.task, self.thresholds = _task(task, thresholds, classes)
        self.device = pick_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.tta = tta  # test-time augmentation: average over each image and its mirror image
        # probabilities are softmax(logits / temperature) (train --calibrate)
        self.temperature = temperature

    @classmethod
    @checked
    def from_run(cls, run_dir: str | Path, device: str | torch.device = "auto", *,
                 image_size: int | None = None, tta: bool = False, precision: str | None = None,
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
                   tta=tta, temperature=card.temperature, task=task_of(card).name,
                   thresholds=card.thresholds,
                   # A run trained in fp32 is evaluated in fp32, so eval reproduces its report.
                   precision=precision or ("fp32" if card.precision == "fp32" else "auto"))
        pred.card = card
        return pred

    @classmethod
    @checked
    def from_pretrained(cls, arch: str, weights: str = "imagenet",
                        device: str | torch.device = "auto") -> Predictor:
        """The backbone with its own ImageNet head, e.g. to check weights and preprocessing."""
        with kept_generators(torch.device("cpu")):  # a new model's random init draws from them
            bb = create_backbone(arch, weights)
        if not bb.categories:
            raise TransferkitError(f"weights '{weights}' carry no class names; use a torchvision "
                                   "weights name")
        return cls(bb.model, bb.categories, bb.preprocessing, device=device)

    @torch.no_grad()
    @checked
    def predict(
        self, images: ImageLike | Iterable[ImageLike],
        topk: int = 5, batch_size: int = 32,
    ) -> list[Answer]:
        """Top-k (class, probability) for each image; a multi-label model's LabelSet (the labels
        at or above their thresholds, and the top-k) for each image.

        Images are paths, PIL images, uint8 tensors (C, H, W) or arrays (H, W, C); float ones with
        values in [0, 1]. One path, one PIL image, one 2-D array or tensor and one 3-D one with 1 or
        3 channels (first or last) is one image; other arrays are a batch along their first axis
        (N, H, W, C), (N, C, H, W) or (N, H, W)."""
        if _one_image(images):
            images = [images]
        k = self._k(topk, batch_size)
        results: list[Answer] = []
        # one batch at a time, as stored (at most the input side), on the CPU
        batch: list[torch.Tensor] = []
        for item in images:
            batch.append(stored(self.preprocessing, item))
            if len(batch) == batch_size:
                results += self._top(batch, k)
                batch = []
        return results + (self._top(batch, k) if batch else [])

    @torch.no_grad()
    def _top(self, stored: list[torch.Tensor], k: int) -> list[Answer]:
        """The answers of a batch of stored images: as model input, the way eval feeds them (with
        --tta, the mirror image averaged in as eval does)."""
        logits = infer(self._forward, self._input(stored), device=self.device,
                       precision=self.precision, tta=self.tta, task=self.task)
        if self.task.multilabel:
            return label_sets(logits, self.classes, k, self.thresholds)
        return top_k(logits, self.classes, k, self.temperature)

    def _input(self, stored: list[torch.Tensor]) -> torch.Tensor:
        """Stored images as model input on the device (ONNX predictor: the graph's uint8 input)."""
        return torch.cat([self.preprocessing.to_input(t[None].to(self.device)) for t in stored])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of model input (the ONNX predictor: run by onnxruntime)."""
        return self.model(x)

    @checked
    def predict_paths(
        self, paths: Sequence[str | Path] | str | Path, topk: int = 5, batch_size: int = 32
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """Predict files and folders (searched recursively). Returns (results, [(path, reason)]):
        each result {"file", "top": [{"class", "prob"}, ...]}, or for a multi-label model {"file",
        "labels": [{"label", "prob"}, ...] (those at or above their thresholds), "top": [...]}."""
        files, errors = expand_paths(paths)
        results = []
        for path, top in self.predict_files(files, topk=topk, batch_size=batch_size):
            if isinstance(top, str):
                errors.append((str(path), top))
            else:
                results.append(as_record(path, top))
        return results, errors

    def _k(self, topk: int, batch_size: int) -> int:
        """How many classes each answer lists: topk, at most all of them; both counts checked."""
        if batch_size < 1:
            raise TransferkitError(f"batch_size {batch_size}: predict at least one image at a time")
        if topk < 1:
            raise TransferkitError(f"topk {topk}: ask for at least 1 class per image")
        return min(topk, len(self.classes))

    @checked
    def predict_files(
        self, files: Iterable[str | Path] | str | Path, topk: int = 5, batch_size: int = 32
    ) -> Iterator[tuple[Path, Answer | str]]:
        """(path, its answer as predict gives it) for each file in order, or (path, why it was
        skipped), a batch at a time.
        One path alone is one path: a file, or a folder's image files (searched recursively).

        Each image is decoded, stored at the input side and its full-size pixels dropped before the
        next is read, so memory holds one photo and one batch, whatever the number of files.
        """
        k = self._k(topk, batch_size)
        if isinstance(files, str | os.PathLike):
            files, missing = expand_paths(files)
            yield from ((Path(p), why) for p, why in missing)
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
                 k: int) -> Iterator[tuple[Path, Answer | str]]:
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


def label_sets(logits: torch.Tensor, classes: Sequence[str], k: int,
               thresholds: Sequence[float] | None = None) -> list[LabelSet]:
    """Each row's LabelSet: the labels whose sigmoid is >= their threshold (None: 0.5 each) and
    the k most probable, both most probable first (equal ones in class order)."""
    task = task_of("multilabel")
    probs = task.probabilities(logits).cpu()
    yes = task.answered(probs, None if thresholds is None else list(thresholds)).tolist()
    order = torch.argsort(probs, dim=1, descending=True, stable=True).tolist()
    return [LabelSet([(classes[j], p[j]) for j in idx if y[j]],
                     [(classes[j], p[j]) for j in idx[:k]])
            for p, y, idx in zip(probs.tolist(), yes, order)]


def as_record(path: str | Path, answer: Answer) -> dict[str, Any]:
    """One image's answer as JSON holds it (predict_paths, predict --json)."""
    if isinstance(answer, LabelSet):
        return {"file": str(path), "labels": [{"label": c, "prob": p} for c, p in answer.labels],
                "top": [{"label": c, "prob": p} for c, p in answer.top]}
    return {"file": str(path), "top": [{"class": c, "prob": p} for c, p in answer]}


def _task(task: str, thresholds: Sequence[float] | None,
          classes: Sequence[str]) -> tuple[Task, list[float] | None]:
    """The Predictor's task and thresholds, or one sentence for thresholds that cannot be."""
    if thresholds is None:
        return task_of(task), None
    cut = [float(t) for t in thresholds]
    if task != "multilabel":
        raise TransferkitError("thresholds are for a multi-label model (task='multilabel'); a "
                               "model with one class per image answers its top-k")
    if len(cut) != len(classes) or not all(0 <= t <= 1 for t in cut):
        raise TransferkitError(f"thresholds: give {len(classes)} probabilities between 0 and 1, "
                               f"one per class, not {cut}")
    return task_of(task), cut


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
        with kept_generators(torch.device("cpu")):  # the random init before the weights load
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


def expand_paths(paths: Sequence[str | Path] | str | Path
                 ) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files as given, folders expanded to their image files; missing paths become errors. One path
    alone is one path, not its characters."""
    files: list[Path] = []
    errors: list[tuple[str, str]] = []
    for p in map(Path, [paths] if isinstance(paths, str | os.PathLike) else paths):
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
