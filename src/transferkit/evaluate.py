"""`transferkit eval`: which split of which data a run is scored on, and how: the held-out split it
recorded (split.json), another split or data set with the same classes, a report beside the run."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from . import runfiles
from .arguments import checked
from .checkpoint import ModelCard, read_card
from .data import heldout
from .data.labelfile import is_label_file
from .data.preprocess import Preprocessing
from .data.sources import DataSource, Split, check_data_arg, is_named, laid_out, load_source
from .data.splits import multi_hot
from .errors import TransferkitError
from .predict import Predictor
from .report import calibration, measured_on, write_report
from .report.error_analysis import write_errors
from .training.engine import evaluate
from .training.runfolder import writer_of

log = logging.getLogger(__name__)


@checked
def evaluate_run(
    run_dir: str | Path, data: str | None = None, *, data_dir: str | None = None,
    split: str | None = None, batch_size: int = 128, device: str | torch.device = "auto",
    workers: int = 2,
    image_size: int | None = None, tta: bool = False, report_dir: str | Path | None = None,
) -> tuple[dict[str, Any], str, Path | None]:
    """Evaluate a run on a data set with the same classes; writes eval-<data>-<split>.md in the
    run (or `report_dir`) and returns (metrics, what they were measured on, the report or None if
    unwritable). A run still training gets no report in its folder (its model will change): only
    `report_dir` gets one, and what it was measured on names the epoch of the model scored.

    On the run's own data (the default) it scores the split the run held out: test if the data has
    one, else the validation split exactly as the run carved it from train (split.json);
    `split="train"` scores the images that trained the model, and says so.
    """
    run_dir = Path(run_dir)
    if batch_size < 1:
        raise TransferkitError(f"batch_size {batch_size}: evaluate at least 1 image per batch")
    card = read_card(run_dir)
    if not (data or card.data):
        raise TransferkitError(f"pass --data: {run_dir / runfiles.CARD} does not record the data "
                               "set it was trained on")
    if not data and not is_named(card.data) and not Path(card.data).exists():
        raise TransferkitError(f"the run's data folder {card.data} (recorded in "
                               f"{run_dir / runfiles.CARD}) is missing; if it moved, pass its new "
                               "place with --data NEWPATH")
    data = data or card.data
    pred, training = _model(run_dir, card, report_dir, device=device, image_size=image_size,
                            tta=tta)
    check_data_arg(data)
    part, src, note = _split_of(run_dir, card, data, split, pred.preprocessing, data_dir=data_dir,
                                workers=workers)
    labels = _labels(data, src, part, pred.classes, pred.task.multilabel)
    logits, part, labels, left = _score(pred, part, labels, batch_size=batch_size, tta=tta,
                                        workers=workers, task=pred.task)
    metrics = _metrics(logits, labels, pred, card)
    said = measured_on(part, data, pred.preprocessing.image_size, tta=tta,
                       note="; ".join(filter(None, (note, training, left))))
    if src.skipped:
        log.warning("%d unreadable files skipped", len(src.skipped))
    other_size = image_size if image_size and image_size != card.preprocessing.image_size else None
    report = None if training and report_dir is None else _write_eval_report(
        Path(report_dir) if report_dir is not None else run_dir, metrics,
        title=f"{run_dir.name} evaluated on {data}", measured_on=said, classes=pred.classes,
        setup={"run": str(run_dir), **({"model": training} if training else {})},
        name=_eval_name(data, part.name, other_size, tta),
        analysed=(logits / pred.temperature, labels, part, pred.classes, pred.preprocessing),
        thresholds=card.thresholds)
    return metrics, said, report


def _metrics(logits: torch.Tensor, labels: torch.Tensor, pred: Predictor,
             card: ModelCard) -> dict[str, Any]:
    """What the report shows, as the run's own report measured it: a multi-label run's labels
    answered at its thresholds (and where they were chosen), a single-label run's calibration."""
    metrics = pred.task.metrics(logits, labels, pred.classes, card.thresholds)
    if pred.task.multilabel:
        metrics["thresholds_chosen_on"] = "validation" if card.thresholds else None
    else:
        metrics["calibration"] = calibration.summary(logits, labels, pred.temperature)
    return metrics


def _score(pred: Predictor, part: Split, labels: torch.Tensor,
           **run: Any) -> tuple[torch.Tensor, Split, torch.Tensor, str]:
    """The logits of `part`; a file that can no longer be read (it went since the split was read)
    is never scored: `part` and `labels` without it, and the words that say how many."""
    unread: list[tuple[str, str]] = []
    logits, _ = evaluate(pred.model, part, pred.preprocessing.to_input, device=pred.device,
                         precision=pred.precision, unread=unread, **run)
    if not unread:
        return logits, part, labels, ""
    log.warning("left out %d image(s) that could no longer be read, e.g. %s (%s)", len(unread),
                *unread[0])
    gone = {f for f, _ in unread}
    keep = torch.tensor([i for i, f in enumerate(part.files or []) if f not in gone],
                        dtype=torch.int64)
    return logits, part.subset(keep), labels[keep], f"{len(unread)} that could no longer be read " \
        "left out"


def _model(run_dir: Path, card: ModelCard, report_dir: str | Path | None,
           **load: Any) -> tuple[Predictor, str]:
    """The run's Predictor and, for a run training now (its folder locked), which model that is
    ('' for a finished run), said in a warning with where the report goes."""
    holder = writer_of(run_dir)
    for attempt in range(3):
        try:
            pred = Predictor.from_run(run_dir, card=card, **load)
            break
        except TransferkitError:
            # a run saving its new best model between our reads of model.json and of the weights
            if holder is None or attempt == 2:
                raise
            time.sleep(0.5)
            card = read_card(run_dir)
    if holder is None:
        return pred, ""
    epoch = "an unrecorded epoch" if card.best_epoch is None else f"epoch {card.best_epoch}"
    log.warning("%s is still training (process %s): scoring its best model so far, from %s; %s",
                run_dir, holder, epoch,
                f"the report goes to {report_dir}" if report_dir is not None else
                "no report is written into the run folder, where a later model would make it "
                "stale (--report-dir DIR writes one elsewhere; or eval again when training ends)")
    return pred, f"the model of {epoch}, the best so far of a run still training"


def _split_of(run_dir: Path, card: ModelCard, data: str, split: str | None, pre: Preprocessing, *,
              data_dir: str | None, workers: int) -> tuple[Split, DataSource, str]:
    """What eval scores: on the run's own data (or that data moved to another folder) the split it
    held out, else the split `data` lays out; with its source and a note for what it measured."""
    own = _same_data(data, card.data)
    # The folder it trained on is gone and another is named: most likely the same data, moved
    # (checked below).
    moved = not own and bool(card.data) and not is_named(card.data) and not Path(
        card.data).expanduser().exists()
    record = held_out_record(run_dir, data) if own or moved else None
    score = dict(data_dir=data_dir, workers=workers, same_pre=pre == card.preprocessing)
    try:
        return split_to_score(run_dir, data, split, pre, record=record, **score)
    except heldout.SplitChanged:
        if not moved:
            raise
        log.warning("%s is not the data %s trained on, moved (its held-out split differs from "
                    "%s): evaluating it as other data", data, run_dir, runfiles.SPLIT)
        return split_to_score(run_dir, data, split, pre, record=None, **score)


def _labels(data: str, src: DataSource, part: Split, classes: list[str],
            multilabel: bool = False) -> torch.Tensor:
    """The model's class index of each image of `part`; for a multi-label model its rows of 0/1,
    a column per class of the model in the model's order (data with one class per image: that
    class's column). Data with other classes, or with several labels per image for a model of one
    class per image, is refused."""
    if multi_hot(part.labels) and not multilabel:
        raise TransferkitError(f"{data} gives several labels per image, and the run answers one "
                               "class per image; evaluate it on data with one class per image")
    if sorted(src.classes) != sorted(classes):
        missing = sorted(set(classes) - set(src.classes))
        extra = sorted(set(src.classes) - set(classes))
        raise TransferkitError(
            f"classes of {data} do not match the run's: missing {missing or 'none'}, "
            f"not known to the model {extra or 'none'}; evaluate on data with the classes "
            f"{', '.join(classes)}"
        )
    if multi_hot(part.labels):
        return part.labels[:, [src.classes.index(c) for c in classes]]
    index = torch.tensor([classes.index(c) for c in src.classes])[part.labels]
    return torch.nn.functional.one_hot(index, len(classes)) if multilabel else index


def _eval_name(data: str, split: str, image_size: int | None, tta: bool) -> str:
    """eval-<data>-<split>[-<size>px][-tta]: the report's file name."""
    size = f"-{image_size}px" if image_size else ""
    return f"eval-{Path(data).name or 'data'}-{split}{size}" + ("-tta" if tta else "")


def _same_data(data: str, trained_on: str) -> bool:
    """Whether `data` names the data set the run trained on (a named set, or the same folder)."""
    if not trained_on:
        return False
    if is_named(data) or is_named(trained_on):
        return data.lower() == trained_on.lower()
    try:
        return Path(data).expanduser().resolve() == Path(trained_on).expanduser().resolve()
    except OSError:
        return False


def held_out_record(run_dir: Path, data: str) -> dict[str, Any] | None:
    """What the run held out of its data: split.json, or for a run without one the rule its
    config.yaml gives, unchecked (None when neither says)."""
    record = heldout.read_split_record(run_dir)
    return _record_from_config(run_dir, data) if record is None else record


def split_to_score(run_dir: Path, data: str, split: str | None, pre: Preprocessing, *,
                   record: dict[str, Any] | None, data_dir: str | None, workers: int,
                   same_pre: bool) -> tuple[Split, DataSource, str]:
    """The split to evaluate, its source, and a note for what it was measured on. `record`: what
    the run held out of `data` (held_out_record), None for other data."""
    if split is None:
        split = record["evaluate"] if record is not None else _first_split(data)
    carved = record is not None and float(record.get("val_split") or 0) > 0 and split in (
        "train", "val")
    if carved:
        src, kept, held = heldout.carve(data, record, pre, data_dir=data_dir, workers=workers)
        part = held if split == "val" else kept
    else:
        src, part = _load_split(data, split, record, pre, data_dir=data_dir, workers=workers)
    if record is None:
        return part, src, ""
    if record.get("unchecked"):
        log.warning("%s records no held-out split (no usable %s; earlier transferkit versions "
                    "wrote none): evaluating the %s split of %s, %s", run_dir, runfiles.SPLIT,
                    split, data, f"carved again by {runfiles.CONFIG}'s val_split and seed; it "
                    "could not be checked against the run's" if carved
                    else "as the data lays it out")
    else:
        heldout.check_same(split, part, record.get(split), len(src.classes),
                           same_pixels=same_pre, run_dir=run_dir, data=data)
    return part, src, _note(split, record, carved)


def _first_split(data: str) -> str:
    """test, else val, else train: the first split the data lays out."""
    layout = laid_out(data)
    return next(s for s in ("test", "val", "train") if s in layout)


def _load_split(data: str, split: str, record: dict[str, Any] | None, pre: Preprocessing, *,
                data_dir: str | None, workers: int) -> tuple[DataSource, Split]:
    """A split the data lays out (not carved), without the copies of train the run dropped."""
    max_train = record.get("max_train_images") if record is not None else None
    dedupe = bool(record and record.get("dedupe")) and split != "train"
    src = load_source(data, preprocessing=pre, data_dir=data_dir, workers=workers,
                      splits=(split, "train") if dedupe else (split,), max_train_images=max_train,
                      seed=int(record.get("seed", 0)) if record else 0,
                      task=heldout.recorded_task(record or {}) if is_label_file(data) else "auto",
                      **heldout.table_options(record or {}))
    if dedupe:
        heldout.check_copies(src, dedupe=True, drop_conflicts=heldout.conflicts_dropped(record))
    part = getattr(src, split)
    if part is None:
        raise TransferkitError(f"{data} has no '{split}' split; choose --split train, val or test")
    return src, part


def _note(split: str, record: dict[str, Any], carved: bool) -> str:
    """What a reader of the figures should know about the run's own split they measure."""
    again = f", re-carved from {runfiles.CONFIG} and unchecked" if record.get("unchecked") else ""
    if split == "val" and carved:
        share = ("by iterative stratification over labels" if record.get("task") == "multilabel"
                 else "of each class")
        return (f"held out of train by the run: {100 * float(record['val_split']):g}% {share}, "
                f"seed {record.get('seed', 0)}{again}; it chose its epoch on them")
    if split == "val":
        return "the run chose its epoch on them"
    if split == "train":
        return ("the run's training images: these images trained the model, so they overstate its "
                "accuracy")
    return ""


def _record_from_config(run_dir: Path, data: str) -> dict[str, Any] | None:
    """For a run without split.json: the rule its config.yaml gives (val_split, seed,
    max_train_images), unchecked."""
    from .config import TrainConfig

    try:
        cfg = TrainConfig.from_yaml(run_dir / runfiles.CONFIG)
    except (TransferkitError, OSError, ValueError, TypeError):
        return None
    layout = laid_out(data)
    carved = heldout.val_carved(data) and cfg.val_split > 0
    return {"unchecked": True, "evaluate": "test" if "test" in layout else "val", "seed": cfg.seed,
            "val_split": cfg.val_split if carved else 0.0,
            "max_train_images": cfg.max_train_images, "dedupe": getattr(cfg, "dedupe", False),
            **heldout.table_options(cfg)}


def _write_eval_report(where: Path, metrics: dict[str, Any], analysed: tuple[Any, ...],
                       thresholds: list[float] | None = None, **report: Any) -> Path | None:
    """The report and its errors in `where` (`analysed`: logits, labels, split, classes,
    preprocessing; `thresholds`: a multi-label run's); if they cannot be written there, one line
    that says so (the figures stand)."""
    try:
        where.mkdir(parents=True, exist_ok=True)
        errors = write_errors(where, report["name"], *analysed, title=report["title"],
                              thresholds=thresholds)
        return write_report(where, metrics, errors=errors, **report)
    except (OSError, TransferkitError) as e:
        why = getattr(e, "strerror", None) or str(e).split(";")[0]
        log.warning("could not write the report into %s (%s); --report-dir DIR writes it elsewhere",
                    where, why)
        return None
