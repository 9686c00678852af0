"""Preprocessing: the one rule from an image file to model input.

Every path calls it: image folders (in memory or streamed), named data sets, the memory
estimate, training, `eval`, `predict` and the Python `Predictor`. So a file gives the same model
input whichever way it comes in.

The rule: an image is *stored* as uint8, then turned into model input.
- A square image no larger than the input side is stored at its own size (CIFAR's 32x32 stays
  32x32 at 224 px: 49x less memory); as model input it is upsampled whole (bilinear, rounded to
  uint8 values, so that upsampling it when stored and when batched give the same numbers).
- Any other image is resized (shorter side to `resize_size`, antialiased) and center-cropped to
  the input side, as torchvision's `weights.transforms()` do. A JPEG file at least twice
  `resize_size` on both sides is first decoded at 1/2, 1/4 or 1/8 scale by libjpeg (never below
  `resize_size`): a 12 Mpx photo decodes several times faster, and every path reads files alike.
- An image whose long side is over 20 times its short side (`images.MAX_ASPECT_RATIO`) is refused
  (`UnreadableImage`), from its header before decoding and in memory alike: the resize would make
  its long side over 20 x `resize_size` (a 1x10000 PNG of 124 bytes: 5.3 GB). Training and eval
  list such a file as unreadable, `predict` answers it with an error row.
A split stores all its images at one side: their own when they are all the same small square,
else the input side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .images import check_shape, read_image

Interpolation = Literal["bilinear", "bicubic"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Input side, the resize a center crop starts from
    (and its interpolation), and the normalization."""

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # of the resize before the crop (timm's weights often say bicubic)
    interpolation: Interpolation = "bilinear"

    def __post_init__(self) -> None:
        for name in ("image_size", "resize_size"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a whole number, not {getattr(self, name)!r}")
        if not 1 <= self.image_size <= self.resize_size:
            raise ValueError(f"need 1 <= image_size <= resize_size, not {self.image_size} and "
                             f"{self.resize_size}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if (not isinstance(v, tuple) or len(v) != 3
                    or not all(isinstance(x, (int, float)) for x in v)):
                raise ValueError(f"{name} must be three numbers (R, G, B), not {v!r}")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"std values must be positive, not {self.std}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError("interpolation must be bilinear or bicubic, "
                             f"not {self.interpolation!r}")

    @property
    def storage_key(self) -> tuple:
        """What decides how a file is stored (for cache keys):
        'scaled-jpeg' marks files read by `read`."""
        return (self.image_size, self.resize_size, "scaled-jpeg") + (
            () if self.interpolation == "bilinear" else (self.interpolation,))

    @property
    def crop_ratio(self) -> float:
        return self.image_size / self.resize_size

    @property
    def normalization(self) -> str:
        fmt = ", ".join
        return (f"mean ({fmt(f'{v:.3f}' for v in self.mean)}) "
                f"std ({fmt(f'{v:.3f}' for v in self.std)})")

    def keeps(self, width: int, height: int) -> bool:
        """Whether an image of this size is stored at its own size (a small square)."""
        return width == height <= self.image_size

    def stored_side(self, sizes: Sequence[tuple[int, int]]) -> int:
        """The side a split of images of these (width, height) stores them at."""
        distinct = set(sizes)
        if len(distinct) == 1:
            (w, h), = distinct
            if self.keeps(w, h):
                return w
        return self.image_size

    def stored_bytes(self, sizes: Sequence[tuple[int, int]], channels: int = 3) -> int:
        """Bytes that a split of images of these (width, height) takes when stored."""
        return len(sizes) * channels * self.stored_side(sizes) ** 2

    def store(self, images: torch.Tensor, side: int | None = None) -> torch.Tensor:
        """uint8 image(s) (..., C, H, W) as stored in a split of side `side` (None: this image
        alone). With `side` the result always has that side: a file whose pixels disagree with its
        header (which decided the split's side) is resized to fit."""
        h, w = images.shape[-2:]
        check_shape(w, h)
        if not self.keeps(w, h):
            mode = InterpolationMode(self.interpolation)
            out = TF.center_crop(TF.resize(images, [self.resize_size], interpolation=mode,
                                           antialias=True),
                                 [self.image_size, self.image_size])
        else:
            out = images if h == (side or h) else upsample(images, side)
        if side is not None and out.shape[-2:] != (side, side):
            out = TF.resize(out, [side, side], antialias=True)
        return out

    def read(self, path: str | Path, side: int | None = None) -> torch.Tensor:
        """An image file as stored (`side`: as in `store`);
        a large JPEG is decoded at a reduced scale."""
        return self.store(read_image(path, self.resize_size), side)

    def to_input(self, stored: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """A stored uint8 batch (N, C, h, w) as normalized float model input (N, 3, S, S)."""
        if stored.shape[-2:] != (self.image_size, self.image_size):
            stored = upsample(stored, self.image_size)
        return self.normalize(stored.float().div_(255), channels_last)

    def normalize(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """Float images in [0, 1] (N, 1 or 3, S, S) -> normalized 3-channel model input."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "resize_size": self.resize_size,
                "mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        # model.json files of earlier versions name no interpolation: they were all bilinear
        return cls(d["image_size"], d["resize_size"],
                   tuple(d["mean"]) if isinstance(d["mean"], list) else d["mean"],
                   tuple(d["std"]) if isinstance(d["std"], list) else d["std"],
                   d.get("interpolation", "bilinear"))


def resolve_preprocessing(*, image_size: int | None = None, mean: Sequence[float] | None = None,
                          std: Sequence[float] | None = None,
                          weights: Preprocessing | None = None) -> Preprocessing:
    """One precedence for every field: explicit settings > the weights' own > defaults.

    An explicit input side keeps the weights' crop ratio (e.g. 224 of 256) for its resize.
    """
    base = weights or Preprocessing()
    size = image_size or base.image_size
    resize = (base.resize_size if size == base.image_size
              else max(size, round(size / base.crop_ratio)))
    return Preprocessing(size, resize, tuple(mean or base.mean), tuple(std or base.std),
                         base.interpolation)


def upsample(images: torch.Tensor, side: int) -> torch.Tensor:
    """Bilinear resize of a small square to `side`,
    rounded to uint8 (no antialiasing: it only enlarges)."""
    batch = images if images.ndim == 4 else images[None]
    out = F.interpolate(batch.float(), size=(side, side), mode="bilinear", align_corners=False)
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out if images.ndim == 4 else out[0]
