"""Batched, device-side training transforms and the batches they run on."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from .policies import Policy, random_erasing
from .preprocess import Preprocessing, upsample
from .splits import Split

log = logging.getLogger(__name__)


class EvalTransform:
    """A stored uint8 batch as model input, by the run's Preprocessing (no randomness)."""

    def __init__(self, preprocessing: Preprocessing, channels_last: bool = False) -> None:
        self.preprocessing, self.channels_last = preprocessing, channels_last

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None, *,
                 part: tuple[slice, int] | None = None) -> torch.Tensor:
        return self.preprocessing.to_input(images, self.channels_last)


class TrainTransform:
    """Random-resized-crop + horizontal flip, an augmentation policy,
    scale to [0, 1], normalize, random erasing; all on the batch's device.

    Every crop is resampled with one `grid_sample` call for the whole batch, so the per-image
    Python work of the classic PIL loop disappears; the policy and erasing draw per image too
    (data/policies.py). With nothing to draw it is the EvalTransform. `size`: the side it outputs
    (--progressive trains early epochs smaller); default the preprocessing's.
    """

    def __init__(self, preprocessing: Preprocessing, *, augment: bool = True, flip: bool = True,
                 scale: tuple[float, float] = (0.35, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 channels_last: bool = False, policy: str = "none", erasing: float = 0.0,
                 size: int | None = None) -> None:
        self.preprocessing, self.augment, self.flip = preprocessing, augment, flip
        self.scale, self.ratio, self.channels_last = scale, ratio, channels_last
        self.policy = None if policy == "none" else Policy(policy)
        self.policy_name, self.erasing = policy, erasing
        self.size = size or preprocessing.image_size

    def resized(self, size: int) -> TrainTransform:
        """The same transform, its output `size` px."""
        return TrainTransform(self.preprocessing, augment=self.augment, flip=self.flip,
                              scale=self.scale, ratio=self.ratio, channels_last=self.channels_last,
                              policy=self.policy_name, erasing=self.erasing, size=size)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None, *,
                 part: tuple[slice | torch.Tensor, int] | None = None) -> torch.Tensor:
        """`part=(rows, n)`: `images` are these rows of a batch of n (one pass,
        or one rank's share); the random numbers are drawn for all n and these
        rows kept, so the result does not depend on how the batch is split.
        `rows` may be a tensor of row numbers (mixing's partner images)."""
        full = self.size == self.preprocessing.image_size
        if not (self.augment or self.policy or self.erasing) and full:
            return self.preprocessing.to_input(images, self.channels_last)
        rand = _drawer(images.shape[0], generator, part, images.device)
        if not self.augment and full and images.shape[-2:] != (self.size, self.size):
            images = upsample(images, self.size)  # as evaluation enlarges small stored images
        x = images.float().div_(255)
        if self.augment:
            x = self._random_resized_crop(x, rand)
        elif x.shape[-2:] != (self.size, self.size):  # --progressive: an early epoch's smaller side
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)
        if self.policy is not None:
            x = self.policy(x, rand)
        x = self.preprocessing.normalize(x, self.channels_last)
        return random_erasing(x, self.erasing, rand) if self.erasing else x

    def _random_resized_crop(self, x: torch.Tensor,
                             rand: Callable[[int], torch.Tensor]) -> torch.Tensor:
        n = x.shape[0]
        h, w = x.shape[-2:]
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * rand(1)
        log_r = (math.log(self.ratio[0])
                 + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * rand(1))
        aspect = torch.exp(log_r) * (h / w)  # crop aspect in normalized units
        cw = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width as a fraction of the image
        ch = torch.sqrt(area / aspect).clamp(max=1.0)
        cx = (1 - cw) * (2 * rand(1) - 1)  # crop centre in [-1, 1] coordinates
        cy = (1 - ch) * (2 * rand(1) - 1)
        sign = torch.where(rand(1) < 0.5, -1.0, 1.0) if self.flip else torch.ones_like(cw)
        zeros = torch.zeros_like(cw)
        theta = torch.cat([cw * sign, zeros, cx, zeros, ch, cy], dim=1).view(n, 2, 3)
        grid = F.affine_grid(theta, [n, x.shape[1], self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                             align_corners=False)


def _drawer(n: int, g: torch.Generator | None, part: tuple[slice | torch.Tensor, int] | None,
            device: torch.device) -> Callable[[int], torch.Tensor]:
    """rand(k): (rows, k) uniforms, drawn from `g` for the whole batch and these rows kept."""
    rows, drawn = part if part is not None else (slice(None), n)

    def rand(k: int = 1) -> torch.Tensor:
        return torch.rand(drawn, k, generator=g,
                          device="cpu" if g is None else g.device)[rows].to(device)

    return rand


def batches(
    split: Split, batch_size: int, *, order: torch.Tensor | None = None, start: int = 0,
    drop_last: bool = False, workers: int = 0, share: Callable[[int], slice] | None = None,
    unread: list[tuple[str, str]] | None = None, fill: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images, labels) slices of a split, in `order` if given, from batch `start`.

    A streamed split is decoded batch by batch in `workers` DataLoader processes, ahead of the
    training step; with `share(n)`, only these rows of each batch of n are decoded (the rest stay
    zero): the rows this process trains on. A file that can no longer be read is added to `unread`
    (path, why) and left out: its row dropped, or with `fill` taken by another image of the batch
    (folders.FileImages.batch); a batch with no readable image comes back empty.
    """
    index = torch.arange(len(split)) if order is None else order  # `order` may hold only some rows
    n = len(index)
    stop = n - n % batch_size if drop_last else n
    chunks = [index[first:first + batch_size]
              for first in range(start * batch_size, stop, batch_size)]
    if split.streamed:
        loader = torch.utils.data.DataLoader(_Decoded(split, chunks, share, fill),
                                             batch_size=None, num_workers=workers,
                                             prefetch_factor=4 if workers else None)
        for images, labels, lost in loader:
            if unread is not None:
                unread += lost
            elif lost:
                log.warning("left out %d image(s) of %s that could no longer be read, e.g. %s (%s)",
                            len(lost), split.name, *lost[0])
            yield images, labels
        return
    for idx in chunks:
        if order is None:  # contiguous: a view, no copy
            yield (split.images[int(idx[0]):int(idx[-1]) + 1],
                   split.labels[int(idx[0]):int(idx[-1]) + 1])
        else:
            yield split.images[idx], split.labels[idx]


class _Decoded(torch.utils.data.Dataset):
    """Batch k of a streamed split, decoded (in a DataLoader worker), with its unreadable files."""

    def __init__(self, split: Split, chunks: list[torch.Tensor],
                 share: Callable[[int], slice] | None, fill: bool) -> None:
        self.split, self.chunks, self.share, self.fill = split, chunks, share, fill

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
        idx = self.chunks[k]
        rows = None if self.share is None else self.share(len(idx))
        return self.split.images.batch(idx, self.split.labels[idx], rows, self.fill)


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)
