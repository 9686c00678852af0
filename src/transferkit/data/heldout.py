"""split.json: which images a run held out (and so which it trained on), for `eval RUN` to score
the right ones."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .. import runfiles
from ..errors import TransferkitError
from ..files import atomic_write
from .folders import folder_layout
from .preprocess import Preprocessing
from .sources import check_leakage, is_named, load_source, train_val_test
from .splits import DataSource, Split

log = logging.getLogger(__name__)

SPLIT_FILE = runfiles.SPLIT
FORMAT = 1


class SplitChanged(TransferkitError):
    """The split carved or loaded now is not the one split.json recorded."""


def fingerprint(split: Split, chunk: int = 256) -> str:
    """sha256 of a split's labels and its files' bytes (image folders: their content hashes, cheap
    and the same whether held in memory or streamed), else of its stored pixels (named sets):
    'files:...' or 'pixels:...'."""
    h = hashlib.sha256(split.labels.numpy().tobytes())
    if split.hashes is not None:
        for digest in split.hashes:
            h.update(digest)
        return f"files:{h.hexdigest()}"
    for start in range(0, len(split), chunk):
        h.update(memoryview(split.images[start:start + chunk].contiguous().numpy()).cast("B"))
    return f"pixels:{h.hexdigest()}"


def _summary(split: Split | None, classes: int) -> dict[str, Any] | None:
    if split is None:
        return None
    return {"images": len(split),
            "per_class": torch.bincount(split.labels, minlength=classes).tolist()}


def _counts(identity: dict[str, Any] | None) -> dict[str, Any] | None:
    """A split's size and images per class, from its identity."""
    return None if identity is None else {k: identity[k] for k in ("images", "per_class")}


def identity(split: Split, classes: int) -> dict[str, Any]:
    """The one record of "is this the same split?": its size, images per class and a fingerprint of
    its labels and contents. split.json keeps it for eval, last.pt for a resume."""
    return {**_summary(split, classes), "fingerprint": fingerprint(split)}


def val_carved(data: str) -> bool:
    """Whether a run on `data` holds its validation split out of train (no val/ folder of its
    own)."""
    return is_named(data) or "val" not in folder_layout(Path(data).expanduser())


def write_split_record(out: Path, data: str, src: DataSource, identities: dict[str, dict[str, Any]],
                       *, val_split: float, seed: int, max_train_images: int | None,
                       dedupe: bool = False) -> None:
    """Write split.json: the rule that carved validation out of train, the counts, the held-out
    files and a fingerprint of their contents to check them by (`identities`: identity() of each
    split, as the run computed them once for last.pt)."""
    carved = src.val is not None and val_carved(data)
    val = None if src.val is None else dict(identities["val"])
    if val is not None:
        val.update(source="carved from train" if carved else "val")
        if src.val.files is not None:
            val["files"] = [os.path.relpath(f, data) for f in src.val.files]
    record = {
        "format": FORMAT, "data": data, "classes": src.classes,
        "evaluate": "test" if src.test is not None else "val",
        # The rule: load train (a stratified subset of max_train_images with seed), hold out
        # val_split of each class, then (dedupe) drop val and test images whose bytes are a
        # training image's.
        "val_split": val_split if carved else 0.0, "seed": seed,
        "max_train_images": max_train_images,
        "dedupe": dedupe,
        "train": _counts(identities.get("train")), "val": val,
        "test": _counts(identities.get("test")),
    }
    atomic_write(Path(out) / SPLIT_FILE, json.dumps(record, indent=2))


def read_split_record(run_dir: Path) -> dict[str, Any] | None:
    """split.json of a run folder, or None for a run of an earlier transferkit (or a damaged file,
    with a warning)."""
    path = Path(run_dir) / SPLIT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError(
                f"format {record.get('format') if isinstance(record, dict) else record!r}")
        if (record.get("evaluate") not in ("test", "val")
                or not isinstance(record.get("val_split"), (int, float))
                or not isinstance(record.get("seed"), int)
                or not all(
                    record.get(s) is None
                    or isinstance(record[s], dict) and isinstance(record[s].get("images"), int)
                    for s in ("train", "val", "test"))):
            raise ValueError("not the fields transferkit writes")
        return record
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s): treating the run as one that records "
                    "no held-out split", path, e)
        return None


def carve(data: str, record: dict[str, Any], pre: Preprocessing, *, data_dir: str | None,
          workers: int) -> tuple[DataSource, Split, Split]:
    """The run's train and val splits carved again from `data` by the record's rule: (source, train,
    val)."""
    src = load_source(data, preprocessing=pre, data_dir=data_dir, splits=("train",),
                      workers=workers, max_train_images=record.get("max_train_images"),
                      seed=int(record.get("seed", 0)))
    src.val = src.test = None
    src.train, src.val, _ = train_val_test(src, float(record["val_split"]),
                                           int(record.get("seed", 0)))
    if record.get("dedupe"):
        check_leakage(src, dedupe=True)
    return src, src.train, src.val


def check_same(name: str, split: Split, recorded: dict[str, Any] | None, classes: int, *,
               same_pixels: bool, run_dir: Path, data: str) -> None:
    """Refuse a split that is not the one the run recorded: the data changed since training."""
    if recorded is None:
        return
    now = _summary(split, classes)
    same = now["per_class"] == recorded.get("per_class", now["per_class"])
    known = recorded.get("fingerprint") if isinstance(recorded.get("fingerprint"), str) else ""
    # Stored pixels depend on the input size: at another --image-size only the counts can be
    # compared.
    if same and known and (known.startswith("files:") or same_pixels):
        same = fingerprint(split) == known
    if not same:
        raise SplitChanged(
            f"the {name} split of {data} is not the one {run_dir} recorded in {SPLIT_FILE} "
            f"({recorded['images']:,} images then, {len(split):,} now"
            f"{', other images' if now['images'] == recorded['images'] else ''}): "
            "the data changed since training; pass --data with images the run never saw, or retrain"
        )
