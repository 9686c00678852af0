"""On-disk caches: decoded image folders and frozen-backbone features, as safetensors files.

Entries are keyed by a digest of everything that decides their content, so a stale entry is
never read: a changed file, size or setting gives another key. Entries are written atomically;
a damaged entry is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import TransferkitError
from .files import atomic_write

log = logging.getLogger(__name__)

FORMAT = 1


def cache_dir(kind: str) -> Path:
    """$TRANSFERKIT_CACHE/<kind> (default ~/.cache/transferkit/<kind>)."""
    root = Path(os.environ.get("TRANSFERKIT_CACHE", "~/.cache/transferkit")).expanduser()
    return root / kind


def digest(*parts: Any) -> str:
    """A key from JSON-able parts and tensors (whose bytes are hashed)."""
    h = hashlib.sha256(str(FORMAT).encode())
    for p in parts:
        if isinstance(p, torch.Tensor):
            flat = p.detach().cpu().contiguous().reshape(-1)
            h.update(flat.view(torch.uint8).numpy().tobytes() if p.numel() else b"")
            h.update(str((p.dtype, tuple(p.shape))).encode())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def load(kind: str, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The cached tensors and metadata under `key`, or None (missing or unreadable)."""
    path = cache_dir(kind) / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as e:
        log.warning("ignoring damaged cache entry %s (%s); rebuilding it", path, e)
        return None


def store(kind: str, key: str, tensors: dict[str, torch.Tensor],
          meta: dict[str, str] | None = None) -> None:
    """Write a cache entry; a full disk or a read-only cache costs only a warning."""
    folder = cache_dir(kind)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"{key}.safetensors",
                     save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))
    except (OSError, TransferkitError) as e:
        log.warning("could not write the %s cache in %s (%s); continuing without it",
                    kind, folder, e)
