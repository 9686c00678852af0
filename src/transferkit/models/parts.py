"""What a run does to a built model of either family: swap its head, count its blocks, freeze a
prefix of them, keep frozen BatchNorm in eval mode, and group its parameters for the optimizer.
"""

from __future__ import annotations

import copy

from torch import nn

from ..errors import TransferkitError
from . import timm, torchvision


def replace_head(model: nn.Module, path: str, num_classes: int) -> None:
    """Swap the layer at `path` for a fresh one with `num_classes` outputs (timm: its own swap)."""
    if timm.is_timm_model(model):
        new_path = timm.reset_head(model, num_classes)
        assert new_path == path, (new_path, path)
        return
    torchvision.reset_head(model, path, num_classes)


def blocks(model: nn.Module, head: str) -> list[list[str]]:
    """The model's blocks, input side first and the classifier last, as parameter name prefixes.

    What --trainable-blocks counts (and per-block learning rates scale). timm's models: timm's
    own grouping (`group_matcher`); torchvision's: their trunk's blocks (`torchvision.blocks`).
    """
    if timm.is_timm_model(model):
        return timm.blocks(model)
    return torchvision.blocks(model, head)


def block_names(model: nn.Module, head: str) -> list[list[str]]:
    """The backbone's blocks (`blocks` without the classifier), from the input up."""
    return blocks(model, head)[:-1]  # what --layer-decay scales


def caches_activations(model: nn.Module) -> bool:
    """Whether `without(model, frozen)` fed the last frozen block's output computes the rest."""
    # True for torchvision's trunks of blocks; not for timm's groups, which are parameter groups,
    # not a sequence of modules (a ViT adds its position embedding between them).
    return not timm.is_timm_model(model)


def frozen_prefix(model: nn.Module, head: str, trainable_blocks: int) -> list[str]:
    """What stays frozen while the last `trainable_blocks` blocks with parameters train.

    torchvision's models: the trunk's modules before them; timm's: the parameter prefixes of the
    blocks before them.
    """
    if timm.is_timm_model(model):
        body = blocks(model, head)[:-1]
        _check_block_count(trainable_blocks, len(body))
        return [p for b in body[: len(body) - trainable_blocks] for p in b]
    names = torchvision.trunk(model, head)
    weighted = [i for i, b in enumerate(names)
                if any(True for _ in model.get_submodule(b).parameters())]
    _check_block_count(trainable_blocks, len(weighted))
    return names[: weighted[-trainable_blocks]] if trainable_blocks else names


def _check_block_count(trainable_blocks: int, count: int) -> None:
    if trainable_blocks > count:
        raise TransferkitError(
            f"--trainable-blocks {trainable_blocks}: this model's backbone has {count} blocks; "
            f"use at most {count} (or --strategy finetune to train all of it)")


def without(model: nn.Module, names: list[str]) -> nn.Module:
    """A view of `model` whose modules `names` pass their input through (nn.Identity).

    All other modules, and so all parameters, are shared with `model`. Fed the output of a
    frozen prefix, it computes the rest of the network.
    """
    if not names:
        return model
    view = copy.copy(model)
    view._modules = dict(model._modules)
    for child in model._modules:
        if child in names:
            view._modules[child] = nn.Identity()
        else:
            inner = [n[len(child) + 1:] for n in names if n.startswith(child + ".")]
            if inner:
                view._modules[child] = without(model._modules[child], inner)
    return view


def set_trainable(model: nn.Module, head: str, backbone: bool, frozen: list[str] = ()) -> None:
    """The head always trains; the backbone when `backbone`, except the modules in `frozen`."""
    prefixes = tuple(f"{f}." for f in frozen)
    # timm's groups also name parameters of the model itself (a ViT's cls_token).
    names = set(frozen)
    for name, p in model.named_parameters():
        frozen_here = name.startswith(prefixes) or name in names
        p.requires_grad_(name.startswith(head + ".") or (backbone and not frozen_here))


def train_mode(model: nn.Module, batchnorm: str = "train") -> None:
    """model.train(), but BatchNorm layers whose parameters are frozen stay in eval mode.

    A frozen BatchNorm must keep normalizing with its pretrained running statistics; in train
    mode it would normalize with batch statistics and overwrite them. `batchnorm="frozen"` keeps
    every BatchNorm in eval mode (its scale and shift still train): the choice for small batches.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if batchnorm == "frozen" or (params and not any(p.requires_grad for p in params)):
                m.eval()


def param_groups(
    model: nn.Module, head: str, lr: float, backbone_lr_mult: float, weight_decay: float
) -> list[dict]:
    """Head and backbone groups, each split so norms and biases get no weight decay."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        is_head = name.startswith(head + ".")
        decay = p.ndim > 1
        groups.setdefault((is_head, decay), []).append(p)
    order = sorted(groups.items(), key=lambda kv: (not kv[0][0], not kv[0][1]))
    return [
        {"params": ps, "lr": lr * (1.0 if is_head else backbone_lr_mult),
         "weight_decay": weight_decay if decay else 0.0,
         "name": f"{'head' if is_head else 'backbone'}{'' if decay else '_no_decay'}"}
        for (is_head, decay), ps in order
    ]
