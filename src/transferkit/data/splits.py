"""A data set's splits and how they are carved: Split, DataSource, stratified hold-outs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Split:
    """One split: images uint8 (N, C, H, W) with C in {1, 3}
    (or files decoded per batch), labels int64 (N,)."""

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
    listed: dict[str, tuple[list[Path], list[int]]] = field(default_factory=dict)


def stratified_split(labels: torch.Tensor, fraction: float,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
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
