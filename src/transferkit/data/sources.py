"""Data sources -> uint8 image tensors with labels: named sets and image folders."""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import TransferkitError, did_you_mean
from .folders import folder_layout, load_folder
from .labelfile import is_label_file, load_label_file, table_splits
from .preprocess import Preprocessing
from .splits import DataSource, Split, multi_hot, stratified_split, stratified_subset

log = logging.getLogger(__name__)

NAMED = ("cifar10", "cifar100", "fashion-mnist", "mnist")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def is_named(data: str) -> bool:
    return data.lower() in NAMED


def load_source(
    data: str, *, preprocessing: Preprocessing, data_dir: str | None = None,
    splits: Sequence[str] = ("train", "test"), workers: int = 2,
    max_train_images: int | None = None,
    seed: int = 0, use_cache: bool = True, stream: str = "auto",
    skip_bad_rows: bool = False, allow_outside_paths: bool = False, task: str = "auto",
) -> DataSource:
    """Load a named set, an image folder or a label file (labelfile.py; its bad rows are refused
    unless `skip_bad_rows`, its paths outside its folder unless `allow_outside_paths`).
    `splits` picks which of train/val/test to load. `task` (auto, single, multilabel): how a
    label file is read (multi-label when a row carries several labels, for auto); only a label
    file can be multi-label.

    Images are stored by `preprocessing`'s rule. `max_train_images` keeps a stratified subset of
    train (before decoding, for folders). Folders are decoded into memory and cached on disk
    unless `use_cache` is False, or streamed from their files (`stream="always"`, or "auto" when
    the decoded images would take more than a quarter of this process's memory).
    """
    check_data_arg(data)
    if task == "multilabel" and not is_label_file(data):
        raise TransferkitError(f"--task multilabel needs a label file with a labels column "
                               f"(--data labels.csv, an image's labels separated by ';'), and "
                               f"{data} gives one class an image: use such a table, or --task "
                               "auto")
    if is_named(data):
        src = _load_named(data.lower(), data_dir, splits, preprocessing)
        if src.train is not None and max_train_images:
            src.train = src.train.subset(stratified_subset(src.train.labels, max_train_images,
                                                           seed))
        return src
    if is_label_file(data):
        return load_label_file(Path(data).expanduser(), preprocessing, splits,
                               task=task, skip_bad_rows=skip_bad_rows,
                               allow_outside=allow_outside_paths,
                               workers=workers, max_train=max_train_images, seed=seed,
                               use_cache=use_cache, stream=stream)
    return load_folder(Path(data).expanduser(), preprocessing, splits, workers=workers,
                       max_train=max_train_images, seed=seed, use_cache=use_cache, stream=stream)


def check_data_arg(data: str) -> None:
    """Refuse a --data that is neither a known set nor a folder, before any heavy work."""
    if is_named(data):
        return
    root = Path(data).expanduser()
    if is_label_file(root) and not root.exists():
        raise TransferkitError(f"label file {data} not found; check its path")
    if not root.exists():
        raise TransferkitError(
            f"data '{data}' is neither a known data set nor an existing folder"
            + did_you_mean(data.lower(), NAMED)
            + f"; known sets: {', '.join(NAMED)}; a folder needs <root>/<class>/<images> "
            "or <root>/train/<class>/<images>"
        )
    if is_label_file(root) and root.is_file():
        return
    if not root.is_dir():
        raise TransferkitError(f"data '{data}' is a file; pass a folder of class sub-folders, "
                               "or a label file ending in .csv, .tsv or .jsonl")


def data_root(data: str) -> str:
    """The folder a run's file paths are relative to: the image folder, or the label file's."""
    return str(Path(data).parent) if is_label_file(data) else data


def laid_out(data: str) -> list[str]:
    """The splits the data lays out itself (not carved): a named set's train and test, a
    folder's train/val/test folders, a label file's split column."""
    if is_named(data):
        return ["train", "test"]
    if is_label_file(data):
        return table_splits(Path(data).expanduser())
    return list(folder_layout(Path(data).expanduser()))


# --- named sets ---------------------------------------------------------------------------


def _load_named(name: str, data_dir: str | None, splits: Sequence[str],
                pre: Preprocessing) -> DataSource:
    if name == "fashion-mnist" and data_dir is None and DEBIAN_FASHION_MNIST.is_dir():
        out = _fashion_mnist_debian(splits)
    else:
        out = _torchvision_named(name, data_dir, splits)
    for split in (out.train, out.val, out.test):
        if split is not None:  # every image of a named set has one size
            side = pre.stored_side([tuple(split.images.shape[-1:-3:-1])])
            split.images = pre.store(split.images, side)
            out.stored_bytes += split.images.nbytes
    return out


def _torchvision_named(name: str, data_dir: str | None, splits: Sequence[str]) -> DataSource:
    import torchvision.datasets as D

    root = Path(data_dir or os.environ.get("TRANSFERKIT_DATA",
                                           "~/.cache/transferkit/data")).expanduser()
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


# --- splitting ----------------------------------------------------------------------------


def train_val_test(src: DataSource, val_split: float,
                   seed: int) -> tuple[Split, Split | None, Split | None]:
    """train/val/test; val is carved from train (stratified, seeded) when the data has none:
    by class, or for multi-label by iterative stratification over the labels (said in the log)."""
    if src.train is None:
        raise TransferkitError(f"{src.name} has no training images "
                               "(expected a train/ folder or class folders)")
    train, val = src.train, src.val
    if val is None and val_split > 0:
        keep, held = stratified_split(train.labels, val_split, seed)
        if len(held) == 0:
            raise TransferkitError(
                f"{src.name} has too few images per class to hold out a validation split; "
                "add images, a val/ folder, or use --val-split 0 with a test/ folder"
            )
        train, val = train.subset(keep, "train"), train.subset(held, "val")
        log.info("val: %d of %d training images held out (--val-split %g, seed %d), %s",
                 len(held), len(keep) + len(held), val_split, seed,
                 "iterative stratification over labels" if multi_hot(train.labels)
                 else "stratified by class")
    if val is None and src.test is None:
        raise TransferkitError(
            f"{src.name} has no val/ or test/ split and --val-split is 0: nothing to evaluate on; "
            "set --val-split 0.1 or add a test/ folder" + (
                " (a label file: rows whose split column says val or test)"
                if is_label_file(src.name) else "")
        )
    return train, val, src.test


def check_leakage(src: DataSource, dedupe: bool = False, shown: int = 5) -> None:
    """Warn about val/test images whose file has the bytes of a training image's;
    `dedupe` drops them.

    Called after val is carved, so a file copied inside train that lands on both sides is found too.
    Copies within one split are no leakage: they are only counted at debug level.
    """
    train = src.train
    if train is None or train.hashes is None:  # named data sets: no files to compare
        return
    originals: dict[bytes, str] = {}
    for f, h in zip(train.files, train.hashes):
        originals.setdefault(h, f)
    for split in (train, src.val, src.test):
        if split is not None and split.hashes is not None and len(set(split.hashes)) < len(split):
            log.debug("%s: %d images are copies of others in the same split (not leakage)",
                      split.name, len(split) - len(set(split.hashes)))
    if src.val is not None and src.test is not None and src.val.hashes and src.test.hashes:
        shared = set(src.val.hashes) & set(src.test.hashes)  # selection saw them, training did not
        if shared:
            log.debug("%d test images are copies of val images",
                      sum(h in shared for h in src.test.hashes))
    for name in ("val", "test"):
        split = getattr(src, name)
        if split is None or split.hashes is None:
            continue
        copies = [i for i, h in enumerate(split.hashes) if h in originals]
        if not copies:
            continue
        pairs = "; ".join(f"{shown_path(originals[split.hashes[i]], src.name)} = "
                          f"{shown_path(split.files[i], src.name)}"
                          for i in copies[:shown]) + ("; ..." if len(copies) > shown else "")
        if not dedupe:
            log.warning("%d of %d %s images are byte-for-byte copies of training images (leakage: "
                        "the %s figures will look better than they are): %s; --dedupe drops them "
                        "from val and test", len(copies), len(split), name, name, pairs)
            continue
        keep = sorted(set(range(len(split))) - set(copies))
        if not keep:
            raise TransferkitError(f"all {len(split)} {name} images of {src.name} are copies of "
                                   f"training images, so --dedupe would leave none to evaluate on; "
                                   f"replace them with other images")
        setattr(src, name, split.subset(torch.tensor(keep, dtype=torch.int64)))
        log.info("--dedupe: dropped %d of %d %s images that are byte-for-byte copies of training "
                 "images (%s); %d left", len(copies), len(split), name, pairs, len(keep))


def shown_path(path: str, data: str) -> str:
    """A path as the user knows it: inside the data folder (or the label file's), relative to
    it."""
    rel = os.path.relpath(path, data_root(data))
    return path if rel.startswith("..") else rel


def warn_imbalance(counts: torch.Tensor, classes: list[str], class_weights: str, *,
                   sampler: str = "none", select_by: str = "accuracy",
                   multilabel: bool = False) -> None:
    """Warn about very small classes and heavy imbalance in the training split (with what the run
    could change). `counts`: splits.label_counts of train (multi-label: each label's positives)."""
    if multilabel:
        _warn_label_imbalance(counts, classes, class_weights)
        return
    small = [f"{classes[i]} ({int(n)})" for i, n in enumerate(counts) if n < SMALL_CLASS]
    if small:
        log.warning("very small classes in train: %s; their scores will be unreliable",
                    ", ".join(small))
    ratio = counts.max().item() / max(1, counts.min().item())
    advice = [hint for hint, applies in (
        ("--select-by balanced-accuracy (accuracy mostly counts the large classes)",
         select_by == "accuracy"),
        ("--sampler balanced or --class-weights auto",
         sampler == "none" and class_weights == "none"),
    ) if applies]
    if ratio > IMBALANCE_RATIO and advice:
        log.warning("heavy class imbalance (largest/smallest class %.0fx); consider %s", ratio,
                    ", and ".join(advice))


def _warn_label_imbalance(positives: torch.Tensor, labels: list[str], class_weights: str) -> None:
    small = [f"{labels[i]} ({int(n)})" for i, n in enumerate(positives) if n < SMALL_CLASS]
    if small:
        log.warning("labels on very few training images: %s; their scores will be unreliable",
                    ", ".join(small))
    ratio = positives.max().item() / max(1, positives.min().item())
    if ratio > IMBALANCE_RATIO and class_weights == "none":
        log.warning("heavy label imbalance (most/least frequent label %.0fx); consider "
                    "--class-weights auto (a positive weight per label)", ratio)


def inverse_frequency(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Loss weights by inverse class frequency (--class-weights auto): 1 on balanced data.

    Multi-label labels (N, C): --class-weights auto is each label's positive weight (the
    pos_weight of BCEWithLogitsLoss), negatives/positives on train, clamped to
    [1/POS_WEIGHT_LIMIT, POS_WEIGHT_LIMIT] so that a label on 2 of 50,000 images does not weigh
    25,000 times (a label on no image weighs POS_WEIGHT_LIMIT)."""
    if multi_hot(labels):
        positives = labels.sum(0).double()
        weight = (len(labels) - positives) / positives.clamp(min=1)
        return weight.clamp(1 / POS_WEIGHT_LIMIT, POS_WEIGHT_LIMIT).float()
    counts = torch.bincount(labels, minlength=classes)
    return (counts.sum() / (classes * counts.clamp(min=1))).float()


SMALL_CLASS = 10  # training images
IMBALANCE_RATIO = 10
POS_WEIGHT_LIMIT = 100.0  # multi-label --class-weights auto: at most this positive weight
