"""What a run trained on and with, recorded in last.pt, so that --resume continues only on the same
data and settings.

The data's fingerprint is its file listing (paths relative to the data folder, sizes, content
hashes, labels: a moved or copied folder still matches) and, for every source, each split's size
and labels. The settings' fingerprint is the resolved config, less what a resume may change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..data import heldout
from ..data.labelfile import row_of
from ..data.sources import data_root, is_named
from ..data.splits import DataSource
from ..errors import TransferkitError

log = logging.getLogger(__name__)

# in last.pt: zlib-compressed JSON as a uint8 tensor (a plain tensor loads weights_only)
KEY = "fingerprints"
SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test"}


def data_listing(data: DataSource, where: str) -> dict[str, Any]:
    """The files of an image folder per split as listed (before unreadable ones are skipped), as
    [path relative to the folder, size, content hash (None for an unreadable file), label (a class
    index, or a multi-label row's multi-hot list: an edited labels cell is a changed file)]; a
    named set by its name. Content, not mtime: a copy of the folder (cp without -p, rsync, a
    download) is the same data."""
    if is_named(where):
        return {"named": where.lower()}
    digests = {}
    for split in (data.train, data.val, data.test):
        if split is not None and split.hashes is not None:
            digests.update({f: h.hex() for f, h in zip(split.files, split.hashes)})
    files: dict[str, list[list[Any]]] = {}
    for split, (paths, labels) in data.listed.items():
        rows = []
        for p, label in zip(paths, labels):
            try:
                size = p.stat().st_size
            except OSError:
                size = -1
            rows.append([os.path.relpath(p, data_root(where)), size, digests.get(str(p)), label])
        files[split] = rows
    return {"classes": data.classes, "files": files}


def splits_of(data: DataSource) -> dict[str, dict[str, Any]]:
    """Each split's identity as the run trains on it (after carving val out of train): the record
    split.json keeps too (heldout.identity)."""
    splits = {name: getattr(data, name) for name in ("train", "val", "test")}
    return {name: heldout.identity(split, len(data.classes)) for name, split in splits.items()
            if split is not None}


def _legacy_splits_of(data: DataSource) -> dict[str, list[Any]]:
    """What a last.pt of transferkit before 2026-12-07 recorded of the splits:
    [size, labels' hash]."""
    out = {}
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        if split is not None:
            labels = split.labels.to(torch.int64).numpy().tobytes()
            out[name] = [len(split), hashlib.sha256(labels).hexdigest()[:16]]
    return out


def settings_record(cfg: TrainConfig, ignore: set[str]) -> dict[str, Any]:
    """The resolved settings that decide what trains (JSON values), less `ignore`."""
    return json.loads(json.dumps({k: getattr(cfg, k) for k in cfg.__dataclass_fields__
                                  if k not in ignore}))


def pack(prints: dict[str, Any]) -> torch.Tensor:
    """The fingerprints as last.pt holds them."""
    return torch.frombuffer(bytearray(zlib.compress(json.dumps(prints).encode())),
                            dtype=torch.uint8)


def unpack(saved: dict[str, Any]) -> dict[str, Any] | None:
    """last.pt's fingerprints, or None for a checkpoint of an earlier version that records none."""
    if KEY not in saved:
        return None
    return json.loads(zlib.decompress(saved[KEY].numpy().tobytes()))


def check_settings(recorded: dict[str, Any], now: dict[str, Any], run: Path) -> None:
    """Refuse a resume whose config.yaml differs from the settings the run started with."""
    # A setting that a newer transferkit added is not recorded by an older run: at its default, it
    # is unchanged.
    defaults = settings_record(TrainConfig(), set())
    was = {k: recorded.get(k, defaults.get(k)) for k in set(recorded) | set(now)}
    changed = [f"{k} {_show(was[k])} -> {_show(now.get(k))}" for k in sorted(was)
               if was[k] != now.get(k)]
    if changed:
        raise TransferkitError(
            f"{run / 'config.yaml'} was edited since the run started: {', '.join(changed)}; "
            "put the values back to resume it, or start a new run with these settings "
            "(--config with another --out)")


def check_data(recorded: dict[str, Any], listing: dict[str, Any], splits: dict[str, dict[str, Any]],
               source: DataSource, data: str) -> None:
    """Refuse a resume on data other than the run's: say which files are gone, new or changed."""
    old, new = recorded.get("listing", {}), listing
    if old.get("named") != new.get("named") or ("named" in old) != ("named" in new):
        raise TransferkitError(f"the run trained on {old.get('named') or 'an image folder'}, "
                               f"not on {data}; resume it on its own data, or start a new run")
    if old.get("classes") != new.get("classes"):
        raise TransferkitError(f"the classes of {data} changed since the run started "
                               f"({old.get('classes')} -> {new.get('classes')}); "
                               "restore them, or start a new run")
    for split in sorted(set(old.get("files", {})) | set(new.get("files", {})), key=_split_order):
        was = {r[0]: r[1:] for r in old.get("files", {}).get(split, [])}
        now = {r[0]: r[1:] for r in new.get("files", {}).get(split, [])}
        # recorded by 0.1 with mtimes: sizes and labels only
        if any(isinstance(r[1], int) for r in was.values()):
            was, now = ({k: [r[0], r[2]] for k, r in rows.items()} for rows in (was, now))
        word = SPLIT_WORDS.get(split, split)
        for paths, what in ((sorted(set(was) - set(now)), "gone"),
                            (sorted(set(now) - set(was)), "new"),
                            (sorted(p for p in set(was) & set(now) if was[p] != now[p]),
                             "changed")):
            if paths:
                n = len(paths)
                verb = {"gone": "are gone", "new": "were added", "changed": "changed"}[what]
                if n == 1:
                    verb = {"gone": "is gone", "new": "was added", "changed": "changed"}[what]
                raise TransferkitError(
                    f"{n} {word} image{'s' if n != 1 else ''} {verb} in {data} since the run "
                    f"started (first: {paths[0]}{row_of(data, paths[0])}); restore the files "
                    "to resume it, or start a new run on the data as it is now")
    was = recorded.get("splits")
    if was and all(isinstance(v, list) for v in was.values()):  # an older last.pt: its own record
        splits = _legacy_splits_of(source)
    if was is not None and was != splits:
        raise TransferkitError(f"the splits of {data} differ from the ones the run started with "
                               f"({_counts(was)} -> {_counts(splits)}); resume it on its own data, "
                               "or start a new run")


def _split_order(split: str) -> tuple[int, str]:
    return (list(SPLIT_WORDS).index(split) if split in SPLIT_WORDS else len(SPLIT_WORDS), split)


def _counts(splits: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v[0] if isinstance(v, list) else v['images']}"
                     for k, v in splits.items())


def _show(v: Any) -> str:
    return "unset" if v is None else str(v)
