"""Predictor.from_run(dir) -> top-k on files, folders, PIL images; evaluate a run on any data."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .checkpoint import load_model_state, read_meta
from .data.images import IMAGE_EXTENSIONS, UnreadableImage, center_fit, open_rgb, pil_to_tensor, to_rgb
from .data.sources import Storage, folder_layout, is_named, load_source
from .data.transforms import BatchTransform, batches
from .engine import infer, predict_logits
from .errors import TransferkitError
from .models import check_side, create_backbone, rebuild
from .report import classification_metrics, write_report
from .runtime import pick_device, resolve_precision

log = logging.getLogger(__name__)


class Predictor:
    """A trained classifier with its preprocessing; call predict() on images or paths."""

    def __init__(
        self, model: torch.nn.Module, classes: Sequence[str], *, image_size: int, resize_size: int,
        mean: Sequence[float], std: Sequence[float], native_size: Sequence[int] | None = None,
        device: str = "auto", precision: str = "auto", flip: bool = False,
    ) -> None:
        self.device = pick_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        self.classes = list(classes)
        self.storage = Storage(image_size, resize_size)
        # Images of the training images' own (small) size are upsampled whole, as in training.
        self.native_size = tuple(native_size) if native_size else None
        self.transform = BatchTransform(image_size, tuple(mean), tuple(std))
        self.flip = flip  # test-time augmentation: average over each image and its mirror image

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", *, image_size: int | None = None,
                 flip: bool = False) -> Predictor:
        """Load a run folder written by `transferkit train` (safetensors + model.json).

        `image_size`: feed the model this input size instead of the trained one (the resize before
        the centre crop scales with it). A model trained on random-resized crops sees objects larger
        than they are at test time, so a slightly larger test size often scores higher ("FixRes").
        `flip`: average the prediction of each image and its mirror image.
        """
        run_dir = Path(run_dir)
        meta = read_meta(run_dir)
        model = rebuild(meta["arch"], meta["head"], meta["num_classes"], meta.get("build_kwargs"))
        model.load_state_dict(load_model_state(run_dir, meta))
        size, resize = meta["image_size"], meta["resize_size"]
        if image_size is not None and image_size != size:
            check_side(meta["arch"], image_size, size)
            size, resize = image_size, round(resize * image_size / size)
        return cls(model, meta["classes"], image_size=size, resize_size=resize,
                   mean=meta["mean"], std=meta["std"], native_size=meta.get("native_size"), device=device,
                   # A run trained in fp32 is evaluated in fp32, so eval reproduces its report.
                   precision="fp32" if meta.get("precision") == "fp32" else "auto", flip=flip)

    @classmethod
    def from_pretrained(cls, arch: str, weights: str = "imagenet", device: str = "auto") -> Predictor:
        """The backbone with its own ImageNet head, e.g. to check weights and preprocessing."""
        bb = create_backbone(arch, weights)
        if not bb.categories:
            raise TransferkitError(f"weights '{weights}' carry no class names; use a torchvision weights name")
        p = bb.preprocessing
        return cls(bb.model, bb.categories, image_size=p.image_size, resize_size=p.resize_size,
                   mean=p.mean, std=p.std, device=device)

    def _prepare(self, image: torch.Tensor) -> torch.Tensor:
        if self.native_size and tuple(image.shape[1:]) == self.native_size:
            return image
        return center_fit(image, self.storage.size, self.storage.resize)

    @torch.no_grad()
    def predict(
        self, images: Iterable[str | Path | Image.Image | torch.Tensor], topk: int = 5, batch_size: int = 32,
    ) -> list[list[tuple[str, float]]]:
        """Top-k (class, probability) for each image: paths, PIL images or uint8 CHW tensors."""
        prepared = []
        for item in images:
            if isinstance(item, torch.Tensor):
                t = item if item.dtype == torch.uint8 else (item.clamp(0, 1) * 255).round().to(torch.uint8)
            elif isinstance(item, Image.Image):
                t = pil_to_tensor(to_rgb(item))
            else:
                t = pil_to_tensor(open_rgb(item))
            prepared.append(self._prepare(t))
        k = max(1, min(topk, len(self.classes)))
        results = []
        for start in range(0, len(prepared), batch_size):
            chunk = prepared[start:start + batch_size]
            x = torch.cat([self.transform(t.unsqueeze(0).to(self.device)) for t in chunk])
            logits = infer(self.model, x, device=self.device, precision=self.precision, flip=self.flip)
            probs = logits.softmax(1).cpu()
            p, idx = probs.topk(k, dim=1)
            for row_p, row_i in zip(p.tolist(), idx.tolist()):
                results.append([(self.classes[i], v) for v, i in zip(row_p, row_i)])
        return results

    def predict_paths(
        self, paths: Sequence[str | Path], topk: int = 5
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """Predict files and folders (searched recursively). Returns (results, [(path, reason)])."""
        files, errors = expand_paths(paths)
        images, names = [], []
        for f in files:
            try:
                images.append(pil_to_tensor(open_rgb(f)))
                names.append(str(f))
            except UnreadableImage as e:
                errors.append((str(f), str(e)))
        preds = self.predict(images, topk=topk) if images else []
        return [{"file": n, "top": [{"class": c, "prob": p} for c, p in pr]} for n, pr in zip(names, preds)], errors


def expand_paths(paths: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files as given, folders expanded to their image files; missing paths become errors."""
    files: list[Path] = []
    errors: list[tuple[str, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                errors.append((str(p), "folder holds no image files"))
            files += found
        elif p.is_file():
            files.append(p)
        else:
            errors.append((str(p), "no such file or folder"))
    return files, errors


def evaluate_run(
    run_dir: str | Path, data: str, *, data_dir: str | None = None, split: str | None = None,
    batch_size: int = 128, device: str = "auto", workers: int = 2, image_size: int | None = None,
    flip: bool = False,
) -> tuple[dict[str, Any], str, Path]:
    """Evaluate a run on a data set with the same classes; writes eval-<data>-<split>.md in the run."""
    run_dir = Path(run_dir)
    pred = Predictor.from_run(run_dir, device=device, image_size=image_size, flip=flip)
    if split is None:
        if is_named(data):
            split = "test"
        else:
            layout = folder_layout(Path(data)) if Path(data).is_dir() else {"test": None}
            split = next(s for s in ("test", "val", "train") if s in layout)
    src = load_source(data, storage=pred.storage, data_dir=data_dir, splits=(split,), workers=workers)
    part = getattr(src, split)
    if part is None:
        raise TransferkitError(f"{data} has no '{split}' split; choose --split train, val or test")
    if sorted(src.classes) != sorted(pred.classes):
        missing = sorted(set(pred.classes) - set(src.classes))
        extra = sorted(set(src.classes) - set(pred.classes))
        raise TransferkitError(
            f"classes of {data} do not match the run's: missing {missing or 'none'}, "
            f"not known to the model {extra or 'none'}; evaluate on data with the classes "
            f"{', '.join(pred.classes)}"
        )
    remap = torch.tensor([pred.classes.index(c) for c in src.classes])
    labels_src = remap[part.labels]
    logits, _ = predict_logits(pred.model, batches(part, batch_size, workers=workers), pred.transform,
                               device=pred.device, precision=pred.precision, desc=split, flip=pred.flip)
    metrics = classification_metrics(logits, labels_src, pred.classes)
    measured_on = (f"{split} split of {data}, {len(part):,} images, stored at {part.resolution}, "
                   f"model input {pred.storage.size}x{pred.storage.size}{', with its mirror image' if flip else ''}")
    name = f"eval-{Path(data).name or 'data'}-{split}"
    other_size = image_size and image_size != read_meta(run_dir)["image_size"]
    name += (f"-{image_size}px" if other_size else "") + ("-tta" if flip else "")
    report = write_report(run_dir, metrics, title=f"{run_dir.name} evaluated on {data}", measured_on=measured_on,
                          classes=pred.classes, setup={"run": str(run_dir)}, name=name)
    if src.skipped:
        log.warning("%d unreadable files skipped", len(src.skipped))
    return metrics, measured_on, report
