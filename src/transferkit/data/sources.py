"""Data sources -> uint8 image tensors with labels: named sets and image folders."""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import cache
from ..errors import TransferkitError, did_you_mean
from .images import IMAGE_EXTENSIONS, UnreadableImage, center_fit, open_rgb, pil_to_tensor

log = logging.getLogger(__name__)

NAMED = ("cifar10", "cifar100", "fashion-mnist", "mnist")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Split:
    """One split held in memory: images uint8 (N, C, H, W) with C in {1, 3}, labels int64 (N,)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def resolution(self) -> str:
        return f"{self.images.shape[-1]}x{self.images.shape[-2]}"

    def subset(self, index: torch.Tensor, name: str | None = None) -> Split:
        images = self.images.select(index) if isinstance(self.images, FileImages) else self.images[index]
        return Split(name or self.name, images, self.labels[index])


class FileImages:
    """The images of a split too large to hold in memory: files, decoded when a batch needs them.

    Indexing gives uint8 tensors like an in-memory split; every image comes out as the stored
    square (centre-fitted unless it already is one), so batches have one shape.
    """

    def __init__(self, paths: list[Path], storage: Storage) -> None:
        self.paths, self.storage = paths, storage
        self.shape = (len(paths), 3, storage.size, storage.size)
        self.dtype = torch.uint8

    def __len__(self) -> int:
        return len(self.paths)

    def select(self, index: torch.Tensor) -> FileImages:
        return FileImages([self.paths[i] for i in torch.as_tensor(index).tolist()], self.storage)

    def __getitem__(self, index) -> torch.Tensor:
        picked = self.paths[index] if isinstance(index, slice) else [self.paths[i] for i in
                                                                      torch.as_tensor(index).tolist()]
        out = torch.zeros((len(picked), 3, self.storage.size, self.storage.size), dtype=torch.uint8)
        for i, path in enumerate(picked):
            out[i] = self.decode(path)
        return out

    def decode(self, path: Path) -> torch.Tensor:
        size = self.storage.size
        try:
            img = pil_to_tensor(open_rgb(path))
        except UnreadableImage as e:
            # Files were checked when the folder was read; one that breaks later trains as black.
            log.warning("unreadable image %s (%s): used as a black image", path, e)
            return torch.zeros((3, size, size), dtype=torch.uint8)
        h, w = img.shape[1:]
        if h == w and h <= size:  # small squares are upsampled whole, as the batched transform does in memory
            return img if h == size else F.interpolate(img[None].float(), size=(size, size), mode="bilinear",
                                                       align_corners=False).round_().clamp_(0, 255)[0].byte()
        return center_fit(img, size, self.storage.resize)

    def __str__(self) -> str:  # what cache keys see: the files (paths, sizes, times) and the storage
        return cache.digest("files", _file_stats(self.paths), self.storage.size, self.storage.resize)


@dataclass
class DataSource:
    """The splits of one data set; `test` is None when the source has no test split."""

    name: str
    classes: list[str]
    train: Split | None = None
    val: Split | None = None
    test: Split | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


@dataclass(frozen=True)
class Storage:
    """How images are stored: small images keep their size; larger ones are center-fitted."""

    size: int  # side of the stored square for large images (the model's input size)
    resize: int  # shorter-side resize before the center crop of `size`


def is_named(data: str) -> bool:
    return data.lower() in NAMED


def load_source(
    data: str, *, storage: Storage, data_dir: str | None = None, splits: Sequence[str] = ("train", "test"),
    workers: int = 2, max_train_images: int | None = None, seed: int = 0, use_cache: bool = True,
    stream: str = "auto",
) -> DataSource:
    """Load a named set or an image folder. `splits` picks which of train/val/test to decode.

    `max_train_images` keeps a stratified subset of train (before decoding, for folders).
    Decoded folders are cached on disk (see cache.py) unless `use_cache` is False. A folder is
    streamed from its files instead (FileImages) with `stream="always"`, or with "auto" when its
    decoded images would take more than a quarter of this machine's memory.
    """
    check_data_arg(data)
    if is_named(data):
        src = _load_named(data.lower(), data_dir, splits)
        if src.train is not None and max_train_images:
            src.train = src.train.subset(stratified_subset(src.train.labels, max_train_images, seed))
        return src
    return _load_folder(Path(data).expanduser(), storage, splits, workers, max_train_images, seed, use_cache,
                        stream)


def check_data_arg(data: str) -> None:
    """Refuse a --data that is neither a known set nor a folder, before any heavy work."""
    if is_named(data):
        return
    root = Path(data).expanduser()
    if not root.exists():
        raise TransferkitError(
            f"data '{data}' is neither a known data set nor an existing folder"
            + did_you_mean(data.lower(), NAMED)
            + f"; known sets: {', '.join(NAMED)}; a folder needs <root>/<class>/<images> "
            "or <root>/train/<class>/<images>"
        )
    if not root.is_dir():
        raise TransferkitError(f"data '{data}' is a file; pass a folder of class sub-folders")


# --- named sets ---------------------------------------------------------------------------


def _load_named(name: str, data_dir: str | None, splits: Sequence[str]) -> DataSource:
    if name == "fashion-mnist" and data_dir is None and DEBIAN_FASHION_MNIST.is_dir():
        return _fashion_mnist_debian(splits)
    import torchvision.datasets as D

    root = Path(data_dir or os.environ.get("TRANSFERKIT_DATA", "~/.cache/transferkit/data")).expanduser()
    cls = {"cifar10": D.CIFAR10, "cifar100": D.CIFAR100, "fashion-mnist": D.FashionMNIST,
           "mnist": D.MNIST}[name]
    out = DataSource(name=name, classes=[])
    for split in ("train", "test"):
        if split not in splits:
            continue
        try:
            ds = cls(str(root), train=split == "train", download=True)
        except Exception as e:  # torchvision raises URLError, RuntimeError, OSError...
            hint = (" Offline: apt-get install dataset-fashion-mnist (Debian) provides it."
                    if name == "fashion-mnist" else
                    " Offline: put the torchvision archive under that folder, or pass an "
                    "image folder with --data.")
            raise TransferkitError(
                f"could not load or download '{name}' into {root} ({type(e).__name__}: {e}).{hint}"
            ) from None
        images = torch.as_tensor(np.asarray(ds.data))
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
        setattr(out, split, Split(split, images.contiguous(), torch.as_tensor(ds.targets)))
        out.classes = list(ds.classes)
    return out


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format): magic, dimensions, then raw uint8 data."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist_debian(splits: Sequence[str]) -> DataSource:
    out = DataSource(name="fashion-mnist", classes=FASHION_CLASSES)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        if split in splits:
            x = _read_idx(DEBIAN_FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz")
            y = _read_idx(DEBIAN_FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz")
            setattr(out, split, Split(split, torch.from_numpy(x.copy()).unsqueeze(1),
                                      torch.from_numpy(y.astype(np.int64))))
    return out


# --- image folders ------------------------------------------------------------------------


def _class_dirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _list_files(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for i, c in enumerate(classes):
        for dirpath, _, files in os.walk(root / c, followlinks=True):
            for f in sorted(files):
                if Path(f).suffix.lower() in IMAGE_EXTENSIONS and not f.startswith("."):
                    paths.append(Path(dirpath) / f)
                    labels.append(i)
    return paths, labels


def folder_layout(root: Path) -> dict[str, Path]:
    """Which split lives where: {'train': root/train, ...} or {'train': root} for a flat tree."""
    named = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if "train" in named:
        return named
    if named:  # only val/ or test/: an evaluation folder
        return named
    return {"train": root}


def _load_folder(
    root: Path, storage: Storage, splits: Sequence[str], workers: int, max_train: int | None, seed: int,
    use_cache: bool = True, stream: str = "auto",
) -> DataSource:
    layout = folder_layout(root)
    first = next(iter(layout.values()))
    classes = _class_dirs(first)
    if not classes:
        raise TransferkitError(
            f"no class folders in {first}; expected {first}/<class name>/<image files>"
        )
    for path in layout.values():
        other = _class_dirs(path)
        if other != classes:
            missing, extra = sorted(set(classes) - set(other)), sorted(set(other) - set(classes))
            raise TransferkitError(
                f"classes in {path} differ from {first}: missing {missing or 'none'}, "
                f"extra {extra or 'none'}; every split needs the same class folders"
            )
    out = DataSource(name=str(root), classes=classes)
    listed = {}
    for split, path in layout.items():
        if split not in splits:
            continue
        paths, labels = _list_files(path, classes)
        if not paths:
            raise TransferkitError(
                f"no image files under {path} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        if split == "train" and max_train:
            keep = stratified_subset(torch.tensor(labels), max_train, seed).tolist()
            paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        listed[split] = paths, labels
    decoded_bytes = sum(len(p) for p, _ in listed.values()) * 3 * storage.size**2
    streaming = stream == "always" or (stream == "auto" and decoded_bytes > memory_bytes() / 4)
    if streaming:
        log.info("streaming %s from its files (decoded it would take %.1f GB)", root, decoded_bytes / 1e9)
    for split, (paths, labels) in listed.items():
        if streaming:
            setattr(out, split, _checked_files(split, paths, labels, storage, workers, out.skipped))
        else:
            setattr(out, split, _decode_cached(split, paths, labels, storage, workers, out.skipped, use_cache))
    return out


def memory_bytes() -> int:
    """This process's part of the memory: the machine's (or its container's limit), divided
    among the torchrun processes on it."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        total = min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        pass
    return total // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _checked_files(name, paths, labels, storage, workers, skipped) -> Split:
    """A streamed split: every file's header is read once, so files that are not images are
    listed and left out up front."""
    def check(p: Path) -> str | None:
        try:
            with Image.open(p):  # reads the header; refuses decompression bombs as decoding would
                pass
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return f"not a readable image ({type(e).__name__}: {e})"
        return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = list(pool.map(check, paths, chunksize=256))
    keep = []
    for i, (p, problem) in enumerate(zip(paths, problems)):
        if problem is None:
            keep.append(i)
        else:
            skipped.append((str(p), problem))
            log.warning("skipping unreadable image %s: %s", p, problem)
    if not keep:
        raise TransferkitError(f"none of the {len(paths)} image files in the {name} split could be read")
    return Split(name, FileImages([paths[i] for i in keep], storage),
                 torch.tensor([labels[i] for i in keep], dtype=torch.int64))


def _decode_cached(name, paths, labels, storage, workers, skipped, use_cache: bool) -> Split:
    """Decode once; later runs on the same files (same paths, sizes, mtimes) and storage read the cache."""
    if not use_cache:
        return _decode(name, paths, labels, storage, workers, skipped)
    key = cache.digest("decoded", storage.size, storage.resize, _file_stats(paths), list(labels))
    hit = cache.load("decoded", key)
    if hit is not None:
        tensors, meta = hit
        skipped += [tuple(x) for x in json.loads(meta.get("skipped", "[]"))]
        log.info("%s: %d decoded images from the cache", name, len(tensors["labels"]))
        return Split(name, tensors["images"], tensors["labels"])
    mine: list[tuple[str, str]] = []
    split = _decode(name, paths, labels, storage, workers, mine)
    skipped += mine
    cache.store("decoded", key, {"images": split.images, "labels": split.labels}, {"skipped": json.dumps(mine)})
    return split


def _file_stats(paths: list[Path]) -> list[tuple[str, int, int]]:
    stats = []
    for p in paths:
        try:
            st = p.stat()
            stats.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((str(p), -1, -1))
    return stats


def _decode(name, paths, labels, storage, workers, skipped) -> Split:
    def load(p: Path) -> torch.Tensor | str:
        try:
            img = pil_to_tensor(open_rgb(p))
        except UnreadableImage as e:
            return str(e)
        if max(img.shape[1:]) > storage.size:
            img = center_fit(img, storage.size, storage.resize)
        return img

    with ThreadPoolExecutor(max(1, workers)) as pool:
        loaded = list(pool.map(load, paths, chunksize=64))
    images, keep = [], []
    for p, y, img in zip(paths, labels, loaded):
        if isinstance(img, str):
            skipped.append((str(p), img))
            log.warning("skipping unreadable image %s: %s", p, img)
        else:
            images.append(img)
            keep.append(y)
    if not images:
        raise TransferkitError(f"none of the {len(paths)} image files in the {name} split could be read")
    shapes = {tuple(t.shape[1:]) for t in images}
    if len(shapes) > 1 or (shapes and next(iter(shapes))[0] != next(iter(shapes))[1]):
        # Mixed sizes: bring every image to the stored square, upscaling the small ones.
        images = [t if tuple(t.shape[1:]) == (storage.size, storage.size)
                  else center_fit(t, storage.size, storage.resize) for t in images]
    return Split(name, torch.stack(images), torch.tensor(keep, dtype=torch.int64))


# --- splitting ----------------------------------------------------------------------------


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held out): `fraction` of every class held out, at least one where possible."""
    g = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = round(len(idx) * fraction)
        if fraction > 0 and len(idx) >= 2:
            n = min(max(n, 1), len(idx) - 1)
        held.append(idx[:n])
        kept.append(idx[n:])
    return torch.sort(torch.cat(kept)).values, torch.sort(torch.cat(held)).values


def stratified_subset(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Indices of a class-balanced subset of about `count` items (every class kept)."""
    if count >= len(labels):
        return torch.arange(len(labels))
    _, held = stratified_split(labels, count / len(labels), seed)
    return held
