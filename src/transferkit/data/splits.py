"""A data set's splits and how they are carved: Split, DataSource, stratified hold-outs.

Labels are int64 class indices (N,), or for a multi-label data set multi-hot rows (N, C) of 0/1
(`labels.dim() == 2` means multi-label; a row may be all zero: an image with none of the labels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# a listing's labels: class indices, or multi-hot rows (multi-label)
LabelList = list[int] | list[list[int]]


@dataclass
class Split:
    """One split: images uint8 (N, C, H, W) with C in {1, 3}
    (or files decoded per batch), labels int64 (N,), or (N, classes) multi-hot (multi-label)."""

    name: str
    # uint8 images, or folders.FileImages (which indexes like them); on a cached stage
    # (training.features), the frozen part's output: features or activations, float
    images: torch.Tensor
    labels: torch.Tensor
    files: list[str] | None = None  # image folders: each image's file
    # image folders: a digest of each file's bytes (exact copies match)
    hashes: list[bytes] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def resolution(self) -> str:
        return f"{self.images.shape[-1]}x{self.images.shape[-2]}"

    @property
    def description(self) -> str:
        return f"{len(self):,} images at {self.resolution}"

    @property
    def streamed(self) -> bool:
        return not isinstance(self.images, torch.Tensor)

    def subset(self, index: torch.Tensor, name: str | None = None) -> Split:
        images = self.images.select(index) if self.streamed else self.images[index]
        picked = torch.as_tensor(index).tolist()
        return Split(name or self.name, images, self.labels[index],
                     None if self.files is None else [self.files[i] for i in picked],
                     None if self.hashes is None else [self.hashes[i] for i in picked])


@dataclass
class DataSource:
    """The splits of one data set; `test` is None when the source has no test split."""

    name: str
    classes: list[str]
    train: Split | None = None
    val: Split | None = None
    test: Split | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    stored_bytes: int = 0  # what its decoded images take (estimated from the headers for folders)
    # folders: files, labels by split
    listed: dict[str, tuple[list[Path], LabelList]] = field(default_factory=dict)
    multilabel: bool = False  # labels are multi-hot rows (a label file's labels column)


def multi_hot(labels: torch.Tensor) -> bool:
    """Whether labels are multi-label rows of 0/1, (N, C), rather than class indices (N,)."""
    return labels.dim() == 2


def label_counts(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Images per class, or for multi-label labels (N, C) each label's positives."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if multi_hot(labels):
        return labels.sum(0)
    return torch.bincount(labels, minlength=classes)


def stratified_split(labels: torch.Tensor, fraction: float,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held out): `fraction` of every class held out, at least one where possible;
    multi-label rows (N, C) by iterative stratification, so that each label keeps its share."""
    if multi_hot(labels):
        side = iterative_stratification(labels, [1 - fraction, fraction], seed)
        return (torch.nonzero(side == 0).flatten(), torch.nonzero(side == 1).flatten())
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
    """Indices of a class-balanced subset of about `count` items (every class kept; multi-label:
    each label about its share)."""
    if count >= len(labels):
        return torch.arange(len(labels))
    _, held = stratified_split(labels, count / len(labels), seed)
    return held


def iterative_stratification(labels: torch.Tensor, fractions: Sequence[float],
                             seed: int) -> torch.Tensor:
    """Which part each multi-hot row (N, C) goes to, for parts of these `fractions` of the rows:
    iterative stratification (Sechidis, Tsoumakas and Vlahavas, ECML PKDD 2011). The label with
    the fewest rows left is dealt first, each of its rows to the part that most lacks that label
    (ties: the part that most lacks rows, then chance), so rare labels are spread before common
    ones fill the parts; rows without a label go last to the parts that most lack rows. The same
    seed gives the same parts."""
    rng = np.random.default_rng(seed)
    y = torch.as_tensor(labels).numpy().astype(bool)
    share = np.asarray(fractions, dtype=np.float64)
    lacks = share * len(y)  # rows each part still wants
    lacks_label = np.outer(share, y.sum(0))  # (parts, C): rows of each label each part wants
    part = np.full(len(y), -1, dtype=np.int64)
    left = y.copy()  # the labels of the rows not dealt yet
    while (counts := left.sum(0)).any():
        rarest = np.flatnonzero(counts == counts[counts > 0].min())
        label = rarest[rng.integers(len(rarest))] if len(rarest) > 1 else rarest[0]
        rows = rng.permutation(np.flatnonzero(left[:, label]))
        for i in rows:
            p = _most_lacking(lacks_label[:, label], lacks, rng)
            part[i] = p
            lacks_label[p] -= y[i]
            lacks[p] -= 1
        left[rows] = False
    for i in rng.permutation(np.flatnonzero(part < 0)):
        part[i] = p = _most_lacking(lacks, lacks, rng)
        lacks[p] -= 1
    return torch.from_numpy(part)


def _most_lacking(first: np.ndarray, then: np.ndarray, rng: np.random.Generator) -> int:
    """The part with the largest `first`, ties by the largest `then`, then by chance."""
    best = np.flatnonzero(first == first.max())
    if len(best) > 1:
        best = best[then[best] == then[best].max()]
    return int(best[rng.integers(len(best))]) if len(best) > 1 else int(best[0])
