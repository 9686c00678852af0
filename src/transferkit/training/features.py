"""What a training stage runs on: the whole network on images,
or its last layers on cached features.

A frozen backbone (linear probe) or frozen first blocks map each image to the same activations
every epoch: they are computed once (un-augmented), cached on disk, and only the rest of the
network trains and evaluates on them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .. import cache
from ..data.folders import without_files
from ..data.splits import Split
from ..models import set_trainable, without
from ..runtime import SINGLE, Dist, memory_bytes
from .engine import Transform, evaluate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """What runs forward in training and evaluation, on which splits, with which transforms."""

    runner: nn.Module  # the whole model, its head alone, or the model without its frozen blocks
    train: Split
    val: Split | None
    test: Split | None
    train_tf: Transform
    eval_tf: Transform
    micro: int | None  # images per forward/backward pass (None: the whole batch)
    eval_batch: int
    cached: bool = False  # the splits hold cached features, not images


def identity(x: torch.Tensor, generator: torch.Generator | None = None, *,
             part=None) -> torch.Tensor:
    """The transform of an already-computed feature batch."""
    return x


def supports_feature_cache(model: nn.Module, head: str) -> bool:
    """True where the head is the model's last layer and a Linear: its input is the feature."""
    return isinstance(model.get_submodule(head), nn.Linear)


def cached_stage(stage: Stage, model: nn.Module, head: str, frozen_blocks: list[str], key: dict, *,
                 device: torch.device, precision: str, use_cache: bool, dist: Dist, workers: int,
                 eval_batch: int) -> Stage:
    """`stage` moved onto cached activations: the head's input (no `frozen_blocks`: a linear probe)
    or the output of the last frozen block. `key` names the backbone, weights and preprocessing;
    the frozen weights themselves are added to it."""
    set_trainable(model, head, bool(frozen_blocks), frozen_blocks)
    prefixes = tuple(f"{f}." for f in frozen_blocks)
    frozen = [v for k, v in model.state_dict().items()
              if not k.startswith(head + ".") and (not frozen_blocks or k.startswith(prefixes))]
    key = dict(key, frozen=cache.digest(*frozen))
    at = frozen_blocks[-1] if frozen_blocks else None
    splits = [None if s is None else features(
        model, head, s, stage.eval_tf, device=device, precision=precision,
        batch_size=stage.eval_batch, identity=key, use_cache=use_cache, dist=dist, at=at,
        workers=workers) for s in (stage.train, stage.val, stage.test)]
    runner = without(model, frozen_blocks) if frozen_blocks else model.get_submodule(head)
    return dataclasses.replace(stage, runner=runner, train=splits[0], val=splits[1], test=splits[2],
                               train_tf=identity, eval_tf=identity, micro=None,
                               eval_batch=eval_batch, cached=True)


@torch.no_grad()
def features(
    model: nn.Module, head: str, split: Split, transform: Transform, *, device: torch.device,
    precision: str, batch_size: int, identity: dict, use_cache: bool = True, dist: Dist = SINGLE,
    at: str | None = None, workers: int = 0,
) -> Split:
    """The head's input (or the output of module `at`) for every image of `split` (eval mode, no
    augmentation), as a Split.

    `identity` names the backbone, its weights and the preprocessing; with the precision, `at` and
    the images' own bytes it keys the cache, so other weights or settings never read these features.
    Under torchrun each rank computes a share and all get all features.
    """
    key = cache.digest("features", identity, precision, at, split.images, split.labels)
    hit = cache.load("features", key) if use_cache else None
    if dist.on and not dist.all(hit is not None):
        hit = None  # compute together unless every rank found them
    if hit is not None:
        log.info("%s: features of %d images from the cache", split.name, len(split))
        return Split(split.name, hit[0]["features"], split.labels)
    # The head's input, or the blocks up to `at` alone:
    # the forward stops there (the rest would be thrown away).
    start, unread = time.perf_counter(), []
    (feats, labels) = evaluate(_UpTo(model, head if at is None else at, before=at is None), split,
                               transform, batch_size=batch_size, device=device,
                               precision=precision, dist=dist, workers=workers,
                               desc=f"features {split.name}", unread=unread)
    log.info("%s: features of %d images computed in %.0f s", split.name, len(split),
             time.perf_counter() - start)
    if unread:  # the images that went since the split was read: left out, and nothing cached
        log.warning("%s: left out %d image(s) that could no longer be read, e.g. %s (%s)",
                    split.name, len(unread), *unread[0])
        return Split(split.name, feats, labels, without_files(split, unread).files)
    if use_cache and dist.local_rank == 0:
        cache.store("features", key, {"features": feats})
    return Split(split.name, feats, split.labels)


class _Reached(Exception):
    """Raised by a forward hook to stop the forward pass with what it captured."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output


def _stop_before(_module: nn.Module, args: tuple) -> None:
    raise _Reached(args[0])


def _stop_after(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
    raise _Reached(output)


class _UpTo(nn.Module):
    """`model` run up to its module `at` alone:
    returns that module's output (`before`: its input)."""

    def __init__(self, model: nn.Module, at: str, before: bool = False) -> None:
        super().__init__()
        self.model, self.at, self.before = model, at, before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module = self.model.get_submodule(self.at)
        hook = (module.register_forward_pre_hook(_stop_before) if self.before
                else module.register_forward_hook(_stop_after))
        try:
            self.model(x)
        except _Reached as reached:
            return reached.output
        finally:
            hook.remove()
        raise RuntimeError(f"module {self.at} did not run in {type(self.model).__name__}'s "
                           "forward pass")


@torch.no_grad()
def activations_fit(model: nn.Module, at: str, size: int, device: torch.device,
                    images: int) -> bool:
    """Whether the output of module `at` for all `images`
    fits in a quarter of this process's memory."""
    model.eval()
    shape = _UpTo(model, at)(torch.zeros(1, 3, size, size, device=device)).shape
    need = math.prod(shape) * 4 * images
    if need > memory_bytes() / 4:
        log.warning("the frozen blocks' activations would take %.1f GB: running them every step "
                    "instead of caching them", need / 1e9)
        return False
    return True
