"""The Backbone record, and what both families do with a weights file: read it, load it; whether
the place a download would come from can be reached.

A leaf: timm.py and torchvision.py build on it, and nothing here knows either family.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.preprocess import Preprocessing
from ..errors import TransferkitError

log = logging.getLogger(__name__)

# How long a download's host may take to answer one connection before the machine counts as
# offline: one check instead of the hub client's retries (12 lines over 46 s without a network).
NETWORK_CHECK_S = 3.0


@dataclass
class Backbone:
    """A created model with its head path, preprocessing and where its weights came from."""

    model: nn.Module
    arch: str
    head: str
    # What the weights were trained with (ImageNet's defaults without weights).
    preprocessing: Preprocessing
    # e.g. "torchvision:IMAGENET1K_V1 (mobilenet_v2-b0353104.pth)", "file:...", "none"
    weights: str
    categories: list[str] = field(default_factory=list)  # the weights' own classes (ImageNet)
    build_kwargs: dict = field(default_factory=dict)  # constructor flags that rebuild() needs
    min_size: int = 1  # the smallest input side the architecture accepts


def is_weights_file(weights: str) -> bool:
    """Whether a --weights value names a file (by its suffix or a path separator)."""
    return Path(weights).suffix in (".pth", ".pt", ".safetensors", ".bin") or os.sep in weights


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


def load_into(model: nn.Module, state: dict[str, torch.Tensor], head: str, origin: str) -> None:
    """Load `state` into `model`; only the classifier's tensors may differ in shape (skipped)."""
    own = model.state_dict()
    # A head of another size (e.g. a checkpoint with other classes) is dropped, not forced in.
    skipped = [k for k, v in state.items()
               if k.startswith(head + ".") and k in own and own[k].shape != v.shape]
    if skipped:
        log.info("weights %s: skipped the classifier's %s (%s there, %s here): a new head trains",
                 origin, ", ".join(skipped), tuple(state[skipped[0]].shape),
                 tuple(own[skipped[0]].shape))
    state = {k: v for k, v in state.items() if k not in skipped}
    shape_clash = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    result = model.load_state_dict(
        {k: v for k, v in state.items() if k not in shape_clash}, strict=False
    )
    missing = [k for k in result.missing_keys if not k.startswith(head + ".")]
    unexpected = [k for k in result.unexpected_keys if "aux" not in k.lower()]
    if missing or unexpected or shape_clash:
        def sample(keys) -> list[str]:  # the first few that name layers, not BatchNorm's counters
            return [k for k in keys if not k.endswith("num_batches_tracked")][:3]
        raise TransferkitError(
            f"weights '{origin}' do not fit {type(model).__name__}: "
            f"{len(missing)} missing (e.g. {sample(missing)}), {len(unexpected)} unexpected "
            f"(e.g. {sample(unexpected)}), {len(shape_clash)} of another shape "
            f"(e.g. {shape_clash[:3]}); the file's keys begin {sample(state)}, the model's "
            f"{sample(own)}. Pass --model with the architecture these weights were saved from."
        )


def unreachable(url: str) -> str | None:
    """Why `url`'s host (or the proxy for it) cannot be reached now, in a few words; None if it
    answered. One connection attempt, at most NETWORK_CHECK_S seconds, name lookup included."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    where = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    answer: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection(where, timeout=NETWORK_CHECK_S).close()
            answer.append(None)
        except OSError as e:
            answer.append(f"{where[0]}: {e.strerror or type(e).__name__}")

    # a thread, because a name lookup ignores the socket's timeout
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(NETWORK_CHECK_S)
    return answer[0] if answer else f"{where[0]} did not answer within {NETWORK_CHECK_S:g} s"
