"""split.json: which images a run held out (and so which it trained on), for `eval RUN` to score
the right ones."""

from __future__ import annotations

import dataclasses
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
from .preprocess import Preprocessing
from .sources import check_leakage, data_root, laid_out, load_source, shown_path, train_val_test
from .splits import DataSource, Split, label_counts

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
    return {"images": len(split),  # per_class: multi-label, each label's positives
            "per_class": label_counts(split.labels, classes).tolist()}


def _counts(identity: dict[str, Any] | None) -> dict[str, Any] | None:
    """A split's size and images per class (multi-label: per label), from its identity."""
    return None if identity is None else {k: identity[k] for k in ("images", "per_class")}


def identity(split: Split, classes: int) -> dict[str, Any]:
    """The one record of "is this the same split?": its size, images per class and a fingerprint of
    its labels and contents. split.json keeps it for eval, last.pt for a resume."""
    return {**_summary(split, classes), "fingerprint": fingerprint(split)}


def val_carved(data: str) -> bool:
    """Whether a run on `data` holds its validation split out of train (no val/ folder of its
    own)."""
    return "val" not in laid_out(data)


def write_split_record(out: Path, data: str, src: DataSource, identities: dict[str, dict[str, Any]],
                       *, val_split: float, seed: int, max_train_images: int | None,
                       dedupe: bool = False, table: dict[str, bool] | None = None) -> None:
    """Write split.json: the rule that carved validation out of train, the counts, the held-out
    files and a fingerprint of their contents to check them by (`identities`: identity() of each
    split, as the run computed them once for last.pt)."""
    carved = src.val is not None and val_carved(data)
    val = None if src.val is None else dict(identities["val"])
    if val is not None:
        val.update(source="carved from train" if carved else "val")
        if src.val.files is not None:
            val["files"] = [os.path.relpath(f, data_root(data)) for f in src.val.files]
    record = {
        "format": FORMAT, "data": data, "classes": src.classes,
        "task": "multilabel" if src.multilabel else "single",  # how eval reads a label file
        "evaluate": "test" if src.test is not None else "val",
        # The rule: load train (a stratified subset of max_train_images with seed), hold out
        # val_split of each class, then (dedupe) drop every copy of a file filed under two classes
        # from every split, and val and test images whose bytes are a training image's.
        "val_split": val_split if carved else 0.0, "seed": seed,
        "max_train_images": max_train_images,
        "dedupe": dedupe, "label_conflicts": "dropped" if dedupe else "kept",
        "train": _counts(identities.get("train")), "val": val,
        "test": _counts(identities.get("test")),
        **(table or {}),  # how a label file was read (its bad rows skipped...)
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
                      seed=int(record.get("seed", 0)), task=recorded_task(record),
                      **table_options(record))
    src.val = src.test = None
    src.train, src.val, _ = train_val_test(src, float(record["val_split"]),
                                           int(record.get("seed", 0)))
    if record.get("dedupe"):
        check_copies(src, dedupe=True, drop_conflicts=conflicts_dropped(record))
    return src, src.train, src.val


TABLE_OPTIONS = ("skip_bad_rows", "allow_outside_paths")


def table_options(settings: Any) -> dict[str, bool]:
    """How a run read its label file (--skip-bad-rows, --allow-outside-paths), from its settings
    (a TrainConfig) or its split.json (a dict), so that eval reads the table alike."""
    get = settings.get if isinstance(settings, dict) else lambda k: getattr(settings, k, False)
    return {k: bool(get(k)) for k in TABLE_OPTIONS}


def recorded_task(record: dict[str, Any]) -> str:
    """The task a run read its data as (split.json of a run before multi-label: auto)."""
    task = record.get("task")
    return task if task in ("single", "multilabel") else "auto"


def conflicts_dropped(record: dict[str, Any]) -> bool:
    """Whether the run's --dedupe dropped label conflicts (runs of earlier versions did not)."""
    return record.get("label_conflicts") == "dropped"


def check_copies(src: DataSource, dedupe: bool = False, *, drop_conflicts: bool = True,
                 shown: int = 5) -> None:
    """Files of an image folder whose bytes are filed under two classes (label conflicts, in any
    split, both copies in train included), then copies of training images in val and test (leakage,
    sources.check_leakage). `dedupe` drops every copy of a conflicting file from every split (no
    copy's label can be trusted, and keeping one would pick a class by chance), then the copies of
    training images from val and test. Called after val is carved."""
    conflicts = label_conflicts(src)
    drop = dedupe and drop_conflicts
    if conflicts:
        _say_conflicts(src, conflicts, dropped=drop, shown=shown)
        view = {n: _without(getattr(src, n), set(conflicts)) for n in ("train", "val", "test")}
        if drop:
            _check_left(src, view)
            src.train, src.val, src.test = view["train"], view["val"], view["test"]
        elif not dedupe:  # leakage is what is left: copies filed under the same class
            src = dataclasses.replace(src, val=view["val"], test=view["test"])
    check_leakage(src, dedupe=dedupe)


# a copy of a file: (split, file, label): a class index, or the multi-hot row as a tuple
Copy = tuple[str, str, int | tuple[int, ...]]


def label_conflicts(src: DataSource) -> dict[bytes, list[Copy]]:
    """The digests of files filed under more than one class (multi-label: given more than one
    set of labels), in any split: {digest: [(split, file, label), ...]}."""
    seen: dict[bytes, list[Copy]] = {}
    for split in (src.train, src.val, src.test):
        if split is not None and split.hashes is not None:
            for f, h, y in zip(split.files, split.hashes, split.labels.tolist()):
                seen.setdefault(h, []).append((split.name, f, tuple(y) if isinstance(y, list)
                                               else y))
    return {h: c for h, c in seen.items() if len({y for *_, y in c}) > 1}


def _named(classes: list[str], label: int | tuple[int, ...]) -> str:
    """A label as the data names it: the class, or the labels joined by ';' (none: 'no label')."""
    if isinstance(label, int):
        return classes[label]
    return ";".join(c for c, on in zip(classes, label) if on) or "no label"


def _say_conflicts(src: DataSource, conflicts: dict[bytes, list[Copy]], *,
                   dropped: bool, shown: int) -> None:
    copies = [c for group in conflicts.values() for c in group]
    where = ", ".join(f"{n} in {name}" for name in ("train", "val", "test")
                      if (n := sum(s == name for s, *_ in copies)))
    groups = "; ".join(" = ".join(f"{shown_path(f, src.name)} ({_named(src.classes, y)})"
                                  for _, f, y in g)
                       for g in list(conflicts.values())[:shown])
    filed = "given more than one set of labels" if src.multilabel else \
        "filed under more than one class"
    said = (f"label conflicts: {len(conflicts)} file(s) {filed}, "
            f"{len(copies)} copies ({where}): {groups}{'; ...' if len(conflicts) > shown else ''}")
    if dropped:
        log.info("--dedupe: dropped all %d copies from every split (no copy's %s can be "
                 "trusted); %s", len(copies), "labels" if src.multilabel else "class", said)
    else:
        log.warning("%s (the same image taught or scored %s); fix their labels, or "
                    "--dedupe drops every copy of such a file from every split", said,
                    "with two sets of labels" if src.multilabel else "as two classes")


def _without(split: Split | None, digests: set[bytes]) -> Split | None:
    """`split` without the files of these digests (None: no split, or nothing left)."""
    if split is None or split.hashes is None:
        return split
    keep = [i for i, h in enumerate(split.hashes) if h not in digests]
    if len(keep) == len(split):
        return split
    return split.subset(torch.tensor(keep, dtype=torch.int64), split.name) if keep else None


def _check_left(src: DataSource, left: dict[str, Split | None]) -> None:
    """--dedupe leaves each split that had images some, and each class in train an image."""
    for name in ("train", "val", "test"):
        if getattr(src, name) is not None and left[name] is None:
            raise TransferkitError(f"every image of the {name} split of {src.name} is filed under "
                                   "more than one class, so --dedupe would leave none; fix their "
                                   "labels")
    if src.train is not None:
        classes = len(src.classes)
        lost = [i for i, (was, now) in enumerate(zip(label_counts(src.train.labels, classes),
                                                     label_counts(left["train"].labels, classes)))
                if was > 0 and now == 0]
        if lost:
            raise TransferkitError(
                f"every training image of {', '.join(src.classes[i] for i in lost)} in "
                f"{src.name} is also filed under another class, so --dedupe would leave the class "
                "none to learn from; fix their labels")


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
