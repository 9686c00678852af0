"""Backbones by name, one interface over two families; callers use this module alone.

    torchvision.py  torchvision's classifiers (bare names, e.g. `resnet18`): weights, head, blocks
    timm.py         timm's (`timm/NAME[.TAG]`): pretrained configs, weights, head, block groups
    backbone.py     the Backbone record; reading a weights file and loading it into a model
    parts.py        what a run does to a built model: head swap, freezing, parameter groups
"""

from __future__ import annotations

import difflib
import fnmatch

from torch import nn

from ..errors import TransferkitError, did_you_mean
from . import timm, torchvision
from .backbone import Backbone
from .parts import (
    block_names,
    blocks,
    caches_activations,
    frozen_prefix,
    param_groups,
    replace_head,
    set_trainable,
    train_mode,
    without,
)
from .torchvision import FIXED_SIZE, available_models, local_weight_file

__all__ = [
    "FIXED_SIZE", "Backbone", "available_models", "block_names", "blocks", "caches_activations",
    "check_input_size", "check_model_name", "check_side", "create_backbone", "frozen_prefix",
    "listing", "local_weight_file", "param_groups", "rebuild", "replace_head", "set_trainable",
    "train_mode", "without",
]


def check_model_name(name: str) -> None:
    """Refuse a model name neither torchvision nor (as timm/NAME) timm knows, with close names."""
    if timm.is_timm(name):
        timm.check_name(name)
        return
    names = available_models()
    if name not in names:
        in_timm = name.partition(".")[0] in timm.architectures()
        hint = f" — timm has it: use --model timm/{name}." if in_timm else did_you_mean(name, names)
        raise TransferkitError(f"unknown model '{name}'{hint} 'transferkit models' lists them.")


def listing(pattern: str | None = None) -> list[tuple[str, list[str], list[str]]]:
    """(model, weights on this machine, other weights) for the models matching `pattern`."""
    # pattern: a glob, else a part of the name; one that matches nothing is an error.
    glob = None if not pattern else pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    rows = [(name, *torchvision.weight_names(name)) for name in available_models()
            if glob is None or fnmatch.fnmatch(name, glob)]
    bare = glob.removeprefix(timm.PREFIX) if glob else ""
    rows += [(timm.PREFIX + name, *timm.weight_tags(name)) for name in timm.architectures(bare)]
    if not rows:
        words = available_models() + [timm.PREFIX + n for n in timm.architectures()]
        close = (difflib.get_close_matches(pattern, words, n=3, cutoff=0.6)
                 or difflib.get_close_matches(f"{timm.PREFIX}{pattern}", words, n=3, cutoff=0.6))
        hint = f" — did you mean {', '.join(close)}?" if close else ""
        raise TransferkitError(f"no model matches '{pattern}'{hint} Search a part of the name, "
                               "e.g. --search convnext, or a glob such as 'efficientnet*'.")
    return rows


def create_backbone(
    arch: str, weights: str = "imagenet", num_classes: int | None = None,
    image_size: int | None = None,
) -> Backbone:
    """Build `arch`, load `weights` (imagenet|DEFAULT|<name>|file|none), swap in a new head.

    `image_size`: the input side asked for; a model whose side is fixed at build (timm's ViTs)
    is built for it.
    """
    check_model_name(arch)
    family = timm if timm.is_timm(arch) else torchvision
    return family.create(arch, weights, num_classes, image_size)


def rebuild(arch: str, head: str, num_classes: int, build_kwargs: dict | None = None) -> nn.Module:
    """An untrained model of a saved run's exact shape, ready for its state dict (no download)."""
    family = timm if timm.is_timm(arch) else torchvision
    return family.rebuild(arch, head, num_classes, build_kwargs)


def check_input_size(bb: Backbone, size: int) -> None:
    """Refuse an input side the architecture cannot take, before any data is loaded."""
    key = "img_size" if timm.is_timm(bb.arch) else "image_size"
    check_side(bb.arch, size, bb.build_kwargs.get(key, bb.preprocessing.image_size), bb.min_size)


def check_side(arch: str, size: int, native: int, min_size: int | None = None) -> None:
    """`size` as the input side of `arch` (built for `native`); min_size: its weights' minimum."""
    if timm.is_timm(arch):
        timm.check_side(arch, size, native)
    else:
        torchvision.check_side(arch, size, native, min_size)
