"""Frozen-backbone features, computed once and cached, so a linear probe (or the last blocks) trains fast."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from . import cache
from .data.sources import Split
from .data.transforms import BatchTransform, batches
from .engine import predict_logits
from .runtime import SINGLE, Dist

log = logging.getLogger(__name__)


def supports_feature_cache(model: nn.Module, head: str) -> bool:
    """True where the head is the model's last layer and a Linear: its input is the feature."""
    return isinstance(model.get_submodule(head), nn.Linear)


class Identity:
    """The transform of an already-computed feature batch."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None, *, part=None) -> torch.Tensor:
        return x


@torch.no_grad()
def features(
    model: nn.Module, head: str, split: Split, transform: BatchTransform, *, device: torch.device,
    precision: str, batch_size: int, identity: dict, use_cache: bool = True, dist: Dist = SINGLE,
    at: str | None = None, workers: int = 0,
) -> Split:
    """The head's input (or the output of module `at`) for every image of `split` (eval mode, no
    augmentation), as a Split.

    `identity` names the backbone and preprocessing (arch, weights, size, mean, std); with the
    images' own bytes it keys the cache, so other weights or settings never read these features.
    Under torchrun each rank computes a share and all get all features.
    """
    key = cache.digest("features", identity, precision, at, split.images, split.labels)
    hit = cache.load("features", key) if use_cache else None
    if dist.on and not dist.all(hit is not None):
        hit = None  # compute together unless every rank found them
    if hit is not None:
        log.info("%s: features of %d images from the cache", split.name, len(split))
        return Split(split.name, hit[0]["features"], split.labels)
    captured: list[torch.Tensor] = []
    if at is None:
        hook = model.get_submodule(head).register_forward_pre_hook(
            lambda _m, args: captured.append(args[0].detach().float().cpu()))
    else:
        hook = model.get_submodule(at).register_forward_hook(
            lambda _m, _args, output: captured.append(output.detach().float().cpu()))
    start = time.perf_counter()
    shared = dist.on and len(split) >= dist.world
    mine = split.subset(torch.arange(len(split))[dist.shard(len(split))]) if shared else split
    try:
        predict_logits(model, batches(mine, batch_size, workers=workers), transform, device=device, precision=precision,
                       desc=f"features {split.name}")
    finally:
        hook.remove()
    feats = dist.gather_rows(torch.cat(captured)) if shared else torch.cat(captured)
    log.info("%s: features of %d images computed in %.0f s", split.name, len(split), time.perf_counter() - start)
    if use_cache and dist.local_rank == 0:
        cache.store("features", key, {"features": feats})
    return Split(split.name, feats, split.labels)
