"""Decoding one image file of any mode into the uint8 RGB tensors the pipeline stores."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import TransferkitError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)


class UnreadableImage(TransferkitError):
    """A file that is not a decodable image; the message says why."""


_BROKEN = (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError)

# PIL warns about an image over Image.MAX_IMAGE_PIXELS (about 89 Mpx) and decodes it anyway, up to
# twice that. transferkit refuses every such file itself (_check_pixels: training, eval and predict
# alike, the file listed with the reason), so PIL's raw warning would only repeat it in a form the
# user cannot act on. It is silenced around each open (where a caller set "always", as pytest's
# recwarn does) and, for threads whose catch_warnings blocks overlap, once for the process.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _open(path: str | Path) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


# The longest side an image may have, in units of its shortest. Preprocessing scales the short side
# to the resize size before the center crop, so what a file becomes grows with its aspect ratio, not
# its pixels: a 124-byte 1x10000 PNG would become 256x2,560,000 pixels (5.3 GB at peak). Real photos
# and panoramas are 1:1 to about 8:1; at 20:1 the center crop already keeps only a twentieth of the
# image, and what a file becomes stays under 28 Mpx (82 MB) at the largest input size, 1024 px.
MAX_ASPECT_RATIO = 20


def check_shape(width: int, height: int) -> None:
    """Refuse an image whose long side is over MAX_ASPECT_RATIO times its short side: resized, it
    would take gigabytes (every path checks it: headers, decoding, images passed in memory)."""
    long, short = max(width, height), max(1, min(width, height))
    if long > MAX_ASPECT_RATIO * short:
        ratio = f"{long / short:,.0f}" if long >= 100 * short else f"{long / short:.1f}"
        raise UnreadableImage(f"is {width}x{height} pixels, an aspect ratio of {ratio}:1, over the "
                              f"limit of {MAX_ASPECT_RATIO}:1 (its short side is resized to the "
                              "model's input, which would make it huge); crop it into parts of at "
                              f"most {MAX_ASPECT_RATIO}:1")


def _check_pixels(im: Image.Image) -> None:
    """Refuse an image whose header declares more pixels than PIL's limit, or a strip too long for
    the resize (check_shape), before decoding it."""
    limit, (w, h) = Image.MAX_IMAGE_PIXELS, im.size
    if limit and w * h > limit:
        raise UnreadableImage(f"declares {w}x{h} pixels ({w * h / 1e6:.0f} Mpx), over the pixel "
                              f"limit of {limit / 1e6:.0f} Mpx (a decompression bomb, or a photo "
                              "to scale down first)")
    check_shape(w, h)


def open_rgb(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Decode any image file (L, P, RGBA, CMYK, 16-bit, float...) into an 8-bit RGB image.

    With `min_side`, a JPEG at least twice that on both sides is decoded at 1/2, 1/4 or 1/8 of its
    size (libjpeg's scaled decoding, several times faster), never below `min_side` on either side.
    """
    try:
        with _open(path) as im:
            _check_pixels(im)
            if min_side:
                im.draft(None, (min_side, min_side))  # JPEG only; other formats ignore it
            im.load()
            im = ImageOps.exif_transpose(im)
    except _BROKEN as e:
        raise UnreadableImage(_reason(path, e)) from None
    return to_rgb(im)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as decoded (EXIF orientation applied), from the file's header alone."""
    try:
        with _open(path) as im:  # refuses decompression bombs as decoding would
            _check_pixels(im)
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except _BROKEN as e:
        raise UnreadableImage(_reason(path, e)) from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _reason(path: str | Path, e: Exception) -> str:
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        return "empty file"
    # over twice the limit: PIL refuses it while opening
    if isinstance(e, Image.DecompressionBombError):
        return f"over the pixel limit of {Image.MAX_IMAGE_PIXELS / 1e6:.0f} Mpx ({e})"
    return str(e) or type(e).__name__


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB,
    scaling high-bit-depth data, not clipping it."""
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


def walk_images(root: Path, unreadable: list[tuple[str, str]] | None = None,
                ) -> tuple[list[Path], list[str]]:
    """The image files under `root`, sorted, following links to folders;
    each real folder and file once.

    A link back to `root` or a folder above it (a loop) and a folder or file reached a second time
    are left out; the second list says which. Folders that cannot be listed (a permission) are
    added to `unreadable` as (folder, why).
    """
    top = os.path.realpath(root)
    files, left_out, folders, seen = [], [], set(), set()
    def failed(e: OSError) -> None:
        if unreadable is not None:
            unreadable.append((str(e.filename), e.strerror or str(e)))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=failed):
        real = os.path.realpath(dirpath)
        if real in folders or (dirpath != str(root) and os.path.commonpath([real, top]) == real):
            left_out.append(f"{dirpath} (the folder {real} again, through a link)")
            dirnames[:] = []
            continue
        folders.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS or name.startswith("."):
                continue
            path = Path(dirpath) / name
            if os.path.realpath(path) in seen:
                left_out.append(f"{path} (the file {os.path.realpath(path)} again)")
                continue
            seen.add(os.path.realpath(path))
            files.append(path)
    return files, left_out


def read_image(path: str | Path, min_side: int | None = None) -> torch.Tensor:
    """Decode an image file of any mode into a uint8 RGB tensor
    (3, H, W) (`min_side`: as open_rgb)."""
    return pil_to_tensor(open_rgb(path, min_side))
