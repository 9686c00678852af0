"""Decoding one image file of any mode into the uint8 RGB tensors the pipeline stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from ..errors import TransferkitError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)


class UnreadableImage(TransferkitError):
    """A file that is not a decodable image; the message says why."""


def open_rgb(path: str | Path) -> Image.Image:
    """Decode any image file (L, P, RGBA, CMYK, 16-bit, float...) into an 8-bit RGB image."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        reason = "empty file" if Path(path).is_file() and Path(path).stat().st_size == 0 else str(e)
        raise UnreadableImage(reason) from None
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB, scaling high-bit-depth data, not clipping it."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        # 16-bit files hold 0..65535; 32-bit int and float images have no fixed range.
        hi = 65535.0 if im.mode.startswith("I;16") or (a.min() >= 0 and a.max() > 255) else 255.0
        if im.mode == "F" and a.max() <= 1.0:
            hi = 1.0
        im = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels become white, the way viewers show them, not black garbage.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB")


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def center_fit(img: torch.Tensor, size: int, resize: int) -> torch.Tensor:
    """Resize the shorter side to `resize` (antialiased bilinear), then center-crop `size`."""
    img = TF.resize(img, [resize], antialias=True)
    return TF.center_crop(img, [size, size])


def resize_for(size: int, crop_ratio: float) -> int:
    """The shorter-side resize that a center crop of `size` at `crop_ratio` starts from."""
    return max(size, round(size / crop_ratio))
