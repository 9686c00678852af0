"""Classify photos with a model.onnx written by `transferkit export`, using only onnxruntime, numpy and Pillow.

    python examples/onnx_classify.py runs/pets/model.onnx photo.jpg [more.jpg ...] [--topk 3]

The file carries everything besides the graph in its metadata: the class names, the input side, the resize
before the center crop (and mean/std, which the graph applies itself). No torch, no transferkit.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps


def preprocess(path: str, size: int, resize: int) -> np.ndarray:
    """A photo as the graph's input: uint8 RGB (3, size, size), resized and center-cropped like transferkit."""
    image = Image.open(path)
    image.draft(None, (resize, resize))  # a large JPEG decodes at 1/2, 1/4 or 1/8 scale, never below `resize`
    image = ImageOps.exif_transpose(image).convert("RGB")
    w, h = image.size
    if w == h <= size:  # a small square is upsampled whole, not cropped
        image = image.resize((size, size), Image.BILINEAR)
    else:  # shorter side to `resize` (Pillow's bilinear filter antialiases when shrinking), then a center crop
        new_w, new_h = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        image = image.resize((new_w, new_h), Image.BILINEAR)
        left, top = round((new_w - size) / 2), round((new_h - size) / 2)
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--topk", type=int, default=3)
    args = parser.parse_args()

    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    classes = json.loads(meta["classes"])
    size, resize = int(meta["image_size"]), int(meta["resize_size"])
    temperature = float(meta.get("temperature", 1.0))

    batch = np.stack([preprocess(p, size, resize) for p in args.images])
    logits = session.run(None, {session.get_inputs()[0].name: batch})[0] / temperature
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for path, row in zip(args.images, probs):
        top = np.argsort(-row)[: args.topk]
        print(f"{path}: " + ", ".join(f"{classes[i]} {100 * row[i]:.1f}% (class {i})" for i in top))


if __name__ == "__main__":
    main()
