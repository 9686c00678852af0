"""--layer-decay: parameter groups with a learning rate
per backbone block, smaller the further from the head."""

from __future__ import annotations

from torch import nn

from ..errors import TransferkitError


def layer_decay_groups(model: nn.Module, head: str, blocks: list[list[str]], *, lr: float,
                       backbone_lr_mult: float, layer_decay: float,
                       weight_decay: float) -> list[dict]:
    """The head at `lr`; the backbone's last block at lr x backbone_lr_mult, each
    block below at `layer_decay` times the one above (`blocks`: from the input up,
    each a list of module names). Backbone parameters in no block (e.g. a norm
    between the last block and the head) go with the last block. Each group is
    split so norms and biases get no weight decay; the head's groups come first."""
    if not blocks:
        raise TransferkitError("--layer-decay needs a backbone made of blocks (ResNet, MobileNet, "
                               "EfficientNet, ConvNeXt...); drop --layer-decay for this model")
    # 0: the last block
    depth_of = {name: len(blocks) - 1 - i for i, names in enumerate(blocks) for name in names}
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if name.startswith(head + "."):
            depth = -1
        else:
            depth = next((d for module, d in depth_of.items()
                          if name == module or name.startswith(module + ".")), 0)
        groups.setdefault((depth, p.ndim > 1), []).append(p)
    out = []
    for (depth, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1])):
        label = "head" if depth < 0 else "backbone:" + "+".join(blocks[len(blocks) - 1 - depth])
        out.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                    "lr": lr if depth < 0 else lr * backbone_lr_mult * layer_decay**depth,
                    "name": label + ("" if decay else "_no_decay")})
    return out
