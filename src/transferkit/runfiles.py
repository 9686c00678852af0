"""Every file of a run folder, by name: the one list of what a run writes,
which --overwrite, a failed start and export's clean-up iterate over."""

from __future__ import annotations

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
