"""Every file of a run folder, by name: the one list of what a run writes,
which --overwrite, a failed start and export's clean-up iterate over."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

CONFIG = "config.yaml"  # the resolved settings, and what was asked for where it differs
MODEL = "model.safetensors"  # the selected weights
CARD = "model.json"  # the ModelCard: architecture, classes, preprocessing, checksums
LAST = "last.pt"  # the resumable TrainState
METRICS = "metrics.jsonl"  # one row per epoch
SPLIT = "split.json"  # which images were held out (data.heldout)
SKIPPED = "skipped.txt"  # unreadable files left out
LOG = "train.log"
LOCK = ".lock"  # held while a process writes the folder
LR_FIND_JSON, LR_FIND_PNG = "lr_find.json", "lr_find.png"
EXPORT = "export.json"  # what `transferkit export` wrote, and where
REPORT = "report"  # report.md / .json / .html and their pictures: report*

# A run that fails before training, with only these files in a folder it created, removes them and
# the folder.
BEFORE_TRAINING = frozenset({LOCK, LOG, CONFIG, SKIPPED, SPLIT, LR_FIND_JSON, LR_FIND_PNG})
# What --overwrite replaces (train.log is kept: the new run's log follows the old one's).
OUTPUTS = (LAST, MODEL, CARD, METRICS, SKIPPED, SPLIT, f"{REPORT}*", "eval-*", "curves.png",
           "errors.csv", "top_losses.png", "lr_find.*")

# A folder holding any of these is a run folder (a run that has begun writes config.yaml first).
MARKS = (CONFIG, CARD, LAST, MODEL)
NAMES = (CONFIG, MODEL, CARD, LAST, METRICS, SPLIT, SKIPPED, LOG, LOCK, LR_FIND_JSON, LR_FIND_PNG,
         EXPORT, *OUTPUTS)


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` holds a run (any of MARKS)."""
    return any((Path(folder) / name).is_file() for name in MARKS)


def of_a_run(path: Path) -> bool:
    """Whether `path` names a file a run writes (a name or pattern above) inside a run folder: what
    no other command (export) may write over."""
    path = Path(path)
    return any(fnmatch(path.name, name) for name in NAMES) and is_run_folder(path.parent)
