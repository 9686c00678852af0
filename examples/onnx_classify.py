"""Classify photos with a transferkit model.onnx, using only onnxruntime, numpy and Pillow.

    python examples/onnx_classify.py runs/pets/model.onnx photo.jpg [more.jpg ...] [--topk 3]

The file carries everything besides the graph in its metadata: the class names and the run's
preprocessing (`preprocessing`: the input side, the resize before the center crop and its
interpolation, mean and std, which the graph applies itself), and how the logits become answers
(`task`: "single", softmax over the classes; "multilabel", a sigmoid per label, each label answered
when it is >= its entry in `thresholds`). No torch, no transferkit.
torchvision's antialiased resize of a uint8 tensor imitates Pillow's filters: the two differ by
1 or 2 levels in a few pixels of a thousand.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def preprocessing(meta: dict[str, str]) -> dict:
    """The run's preprocessing from the file's metadata (image_size, resize_size, mean, std,
    interpolation). A file of an earlier transferkit holds its fields one by one and no
    interpolation: it was bilinear."""
    if "preprocessing" in meta:
        rule = json.loads(meta["preprocessing"])
    else:
        rule = {k: json.loads(meta[k]) for k in ("image_size", "resize_size", "mean", "std")}
        rule["interpolation"] = "bilinear"
    if rule["interpolation"] not in FILTERS or meta.get("crop", "center") != "center":
        raise SystemExit(f"this example resizes bilinear or bicubic and crops the center; the file "
                         f"asks for {rule['interpolation']} and a {meta.get('crop')} crop")
    return rule


def preprocess(path: str, rule: dict) -> np.ndarray:
    """A photo as the graph's input, uint8 RGB (3, size, size): resized, then center-cropped."""
    size, resize = rule["image_size"], rule["resize_size"]
    image = Image.open(path)
    image.draft(None, (resize, resize))  # a large JPEG decodes at 1/2, 1/4 or 1/8, not below resize
    image = ImageOps.exif_transpose(image).convert("RGB")
    w, h = image.size
    if w == h <= size:  # a small square is upsampled whole, not cropped
        return upsample(np.asarray(image, dtype=np.uint8), size).transpose(2, 0, 1)
    # shorter side to `resize` (Pillow's filters antialias when shrinking), then a center crop
    new_w, new_h = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    image = image.resize((new_w, new_h), FILTERS[rule["interpolation"]])
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def upsample(image: np.ndarray, size: int) -> np.ndarray:
    """A small square (n, n, 3) enlarged to (size, size, 3) as transferkit does: bilinear without
    antialiasing (torch's interpolate, align_corners=False) in float32, rounded half to even.
    Pillow's bilinear filter rounds halves up, and an enlargement lands on halves often."""
    n, half = image.shape[0], np.float32(0.5)
    scale = np.float32(n) / np.float32(size)
    src = np.maximum((np.arange(size, dtype=np.float32) + half) * scale - half, 0)
    lo = src.astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    w = (src - lo).astype(np.float32)
    x = image.astype(np.float32)
    rows = x[lo] * (1 - w)[:, None, None] + x[hi] * w[:, None, None]
    out = rows[:, lo] * (1 - w)[None, :, None] + rows[:, hi] * w[None, :, None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def classify(session: ort.InferenceSession, paths: Sequence[str]) -> np.ndarray:
    """Class probabilities (N x classes) of the photos, as softmax(logits / temperature); for a
    multi-label model each label's sigmoid(logit)."""
    meta = session.get_modelmeta().custom_metadata_map
    rule = preprocessing(meta)
    batch = np.stack([preprocess(p, rule) for p in paths])
    logits = session.run(None, {session.get_inputs()[0].name: batch})[0].astype(np.float64)
    if meta.get("task") == "multilabel":
        return 1 / (1 + np.exp(-logits))
    logits = logits / float(meta.get("temperature", 1.0))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return probs / probs.sum(1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--topk", type=int, default=3)
    args = parser.parse_args()

    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    classes = json.loads(meta["classes"])
    # a multi-label model: every label at or above its threshold, then the top-k
    thresholds = json.loads(meta["thresholds"]) if meta.get("task") == "multilabel" else None
    for path, row in zip(args.images, classify(session, args.images)):
        order = np.argsort(-row, kind="stable")
        top = ", ".join(f"{classes[i]} {100 * row[i]:.1f}% (class {i})"
                        for i in order[: args.topk])
        if thresholds is None:
            print(f"{path}: {top}")
            continue
        labels = ", ".join(f"{classes[i]} {100 * row[i]:.1f}%" for i in order
                           if row[i] >= thresholds[i])
        print(f"{path}: {labels or 'no label at or above its threshold'}  (top: {top})")


if __name__ == "__main__":
    main()
