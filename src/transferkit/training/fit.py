"""The one place that sequences a training run. Read `train` top to bottom."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .. import models, runfiles, runtime, task
from ..arguments import checked
from ..checkpoint import META_FILE, ModelCard, load_model_state, read_card, update_card
from ..config import TrainConfig, requested_from
from ..data import heldout, sources
from ..data.preprocess import Preprocessing, resolve_preprocessing
from ..data.splits import DataSource, label_counts
from ..data.transforms import EvalTransform
from ..errors import TransferkitError
from ..files import atomic_write
from ..logs import run_logging
from ..report import RunResult, calibration, measured_on, multilabel, write_report
from ..report.error_analysis import write_errors
from ..runtime import Compute
from ..task import task_of
from . import engine, fingerprint, lr_find
from .loop import Job, epochs, held_out_read, start_state, unread_setup
from .plan import build_stage, check_progressive, frozen_blocks, make_plan, resolve_strategy
from .runfolder import UNCHECKED, RunStart, begin_writing, run_folder, settings_of
from .state import TrainState
from .summary import setup_section

log = logging.getLogger(__name__)


@checked
def train(config: TrainConfig | None = None, *, resume: str | Path | None = None,
          overwrite: bool = False, **settings: Any) -> RunResult:
    """Train, select on validation, evaluate once on test, write the run folder.

    Under torchrun every process calls this with the same arguments; they train together
    (DistributedDataParallel) and rank 0 alone writes the run folder.
    """
    started = time.perf_counter()
    cfg = _settings(config, resume, settings)
    with runtime.distributed(cfg.device) as (dist, device), runtime.kept_generators(device), \
            run_logging(quiet=not dist.main) as log_to_file, \
            run_folder(cfg, resume, overwrite, dist) as run:
        if dist.main:
            log_to_file(Path(run.out) / runfiles.LOG)
        out = Path(run.out)
        job = prepare(run.cfg, _compute(run.cfg, dist, device), out, run.saved)
        prints = _begin(job, run)  # resume checked against its data; config.yaml, split.json
        job.stage = build_stage(job.plan, job.cfg, job.bb, job.card.preprocessing, job.data, job.hw)
        if job.cfg.lr == "auto":  # before the fingerprint: a resume reads the lr from config.yaml
            job.cfg = lr_find.auto_lr(job, out)
        state = _train(job, out, run.saved, fingerprint.pack(
            {**prints, "settings": fingerprint.settings_record(job.cfg, UNCHECKED)}))
        result = _final_evaluation(job, out, state)
    result.seconds = time.perf_counter() - started
    return result


@checked
def find_lr(config: TrainConfig | None = None, *, steps: int = lr_find.STEPS,
            start_lr: float = lr_find.START_LR, end_lr: float | None = None,
            **settings: Any) -> lr_find.RangeTest:
    """`transferkit lr-find`: the LR range test on what train would train (data, model, transforms,
    precision, parameter groups); writes lr_find.json and lr_find.png to --out (default
    runs/lr-find-<data>-<model>-<time>)."""
    cfg = _settings(config, None, settings)
    lr_find.check_ramp(steps, start_lr, end_lr or lr_find.END_LR)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(cfg.out or f"runs/lr-find-{Path(cfg.data).name or 'data'}-{cfg.model}-{stamp}")
    with runtime.distributed(cfg.device) as (dist, device), runtime.kept_generators(device), \
            run_logging(quiet=False):
        if dist.on:
            raise TransferkitError("lr-find runs in one process; start it without torchrun")
        job = prepare(cfg, _compute(cfg, dist, device), None, None, test=False)
        job.stage = build_stage(job.plan, job.cfg, job.bb, job.card.preprocessing, job.data, job.hw)
        found = lr_find.run_test(job, steps=steps, start_lr=start_lr, end_lr=end_lr)
        cfg = job.cfg
        found.notes = {"model": cfg.model, "weights": job.bb.weights, "data": cfg.data,
                       "strategy": cfg.strategy, "image_size": job.plan.image_size,
                       "optimizer": cfg.optimizer, "precision": job.hw.precision,
                       "backbone_lr_mult": cfg.backbone_lr_mult}
        lr_find.write(out, found, f"{cfg.model} on {cfg.data}, {cfg.strategy}")
    return found


def _settings(config: TrainConfig | None, resume: str | Path | None,
              settings: dict[str, Any]) -> TrainConfig:
    """The run's settings (settings_of); as the CLI does, train and lr-find start only on data
    they are given."""
    cfg = settings_of(config, resume, settings)
    if cfg.data is None:
        raise TransferkitError(
            "no data to train on: pass data= (--data, or data: in a config file) an image folder "
            f"(root/<class>/ or root/train/<class>/) or one of {', '.join(sources.NAMED)}; "
            "TrainConfig.create(recipe='demo') is the offline demo job")
    return cfg


def _compute(cfg: TrainConfig, dist: runtime.Dist, device: torch.device) -> Compute:
    """Where this process computes; a wrong --data is the first line the user sees."""
    sources.check_data_arg(cfg.data)
    return Compute(dist, device, runtime.resolve_precision(cfg.precision, device))


def prepare(cfg: TrainConfig, hw: Compute, out: Path | None, saved: dict[str, Any] | None, *,
            test: bool = True) -> Job:
    """What train and lr-find share: the settings resolved, the backbone with its new head, the data
    and the transfer plan (`test`: load the test split; the range test trains on train alone)."""
    runtime.seed_everything(cfg.seed, hw.device)
    if cfg.recipe:
        log.info("recipe '%s'", cfg.recipe)
    if hw.dist.on:
        runtime.check_world(hw.dist, hw.device, cfg.batch_size, cfg.batchnorm)
    # Under torchrun the first process of each machine fetches weights and fills the caches.
    with hw.dist.local_main_first():
        bb = models.create_backbone(cfg.model, cfg.weights, image_size=cfg.image_size)
        pre = resolve_preprocessing(image_size=cfg.image_size, mean=cfg.mean, std=cfg.std,
                                    weights=bb.preprocessing)
        models.check_input_size(bb, pre.image_size)
        check_progressive(cfg, bb, pre.image_size)
        frozen = frozen_blocks(cfg, bb)  # refused before the data is read when they do not fit
        log.info("model %s, weights %s, input %dpx, %s", cfg.model, bb.weights, pre.image_size,
                 pre.normalization)
        if cfg.weights.lower() == "none" and cfg.strategy != "linear":
            log.info("random weights: the backbone learns at %g x the head's lr "
                     "(--backbone-lr-mult)", cfg.backbone_lr_mult)
        cfg, requested = _resolved(cfg, bb, pre, out, saved)
        data = _load_data(cfg, pre)
        cfg = task.settle(cfg, data.multilabel, requested)
        if not test:
            data.test = None
        cfg = resolve_strategy(cfg, len(data.train), requested)
    card = _classifier(cfg, bb, pre, data.classes, hw)
    return Job(cfg, bb, card, data, make_plan(cfg, bb, pre, data, hw.device, frozen), hw, requested)


def _begin(job: Job, run: RunStart) -> dict[str, Any]:
    """A resume goes on with the files it started with, or stops here; rank 0 writes the run's first
    files. Returns the data's fingerprints (what last.pt records)."""
    cfg, data, out = job.cfg, job.data, Path(run.out)
    prints = {"listing": fingerprint.data_listing(data, cfg.data),
              "splits": fingerprint.splits_of(data)}
    # None: an older last.pt
    recorded = None if run.saved is None else fingerprint.unpack(run.saved)
    if recorded is not None:
        fingerprint.check_data(recorded, prints["listing"], prints["splits"], data, cfg.data)
    if job.hw.dist.main:
        begin_writing(out, cfg, run.overwrite, data.skipped, job.requested)
        heldout.write_split_record(out, cfg.data, data, prints["splits"], val_split=cfg.val_split,
                                   seed=cfg.seed, max_train_images=cfg.max_train_images,
                                   dedupe=cfg.dedupe, table=heldout.table_options(cfg))
        if (run.saved is not None and (out / META_FILE).is_file()
                and read_card(out).data != cfg.data):
            update_card(out, data=cfg.data)  # resumed on its moved data: eval finds it there
    return prints


def _resolved(cfg: TrainConfig, bb: models.Backbone, pre: Preprocessing, out: Path | None,
              saved: dict[str, Any] | None) -> tuple[TrainConfig, dict[str, Any]]:
    """The settings as they train (the weights actually loaded, the preprocessing
    resolved from them), and what was asked for where it differs (a resumed run
    keeps what its config.yaml says)."""
    kind, _, name = bb.weights.partition(":")
    weights = {"torchvision": name.split(" (")[0], "file": name}.get(kind, cfg.weights)
    resolved = cfg.replace(weights=weights, image_size=pre.image_size, mean=pre.mean, std=pre.std)
    asked = {k: getattr(cfg, k) for k in ("weights", "image_size", "mean", "std")
             if getattr(cfg, k) != getattr(resolved, k)}
    if saved is not None:
        asked = {**requested_from(out / runfiles.CONFIG), **asked}
    return resolved, asked


def _load_data(cfg: TrainConfig, pre: Preprocessing) -> DataSource:
    """The splits (val carved from train when the data has none), with unreadable files listed."""
    src = sources.load_source(cfg.data, preprocessing=pre, data_dir=cfg.data_dir,
                              splits=("train", "val", "test"), workers=cfg.workers,
                              max_train_images=cfg.max_train_images, seed=cfg.seed,
                              use_cache=cfg.cache, stream=cfg.stream, task=cfg.task,
                              **heldout.table_options(cfg))
    src.train, src.val, src.test = sources.train_val_test(src, cfg.val_split, cfg.seed)
    # after carving val: a copy may now be on both sides
    heldout.check_copies(src, dedupe=cfg.dedupe)
    if not src.multilabel:  # task.settle refuses --calibrate for multi-label data
        calibration.check_calibration_split(cfg.calibrate, src.val, cfg.data)
    if len(src.classes) < 2:
        raise TransferkitError(f"{cfg.data} has one class ({src.classes[0]}); a classifier needs "
                               "at least two")
    log.info("data %s: %d classes; train %s; val %s; test %s", cfg.data, len(src.classes),
             *("none" if s is None else s.description for s in (src.train, src.val, src.test)))
    if cfg.patience is not None and src.val is None:
        raise TransferkitError("--patience watches a validation metric, and this run has no "
                               "validation split; use --val-split 0.1 (or a val/ folder), or drop "
                               "--patience")
    counts = label_counts(src.train.labels, len(src.classes))
    sources.warn_imbalance(counts, src.classes, cfg.class_weights, sampler=cfg.sampler,
                           select_by=cfg.select_by, multilabel=src.multilabel)
    return src


def _classifier(cfg: TrainConfig, bb: models.Backbone, pre: Preprocessing, classes: list[str],
                hw: Compute) -> ModelCard:
    """Swap in the new head and place the model; returns the card that goes with its weights."""
    models.replace_head(bb.model, bb.head, len(classes))
    if hw.dist.rank > 0:  # own dropout noise; weights come from rank 0
        torch.manual_seed(runtime.rank_seed(cfg.seed, hw.dist.rank))
    if cfg.batchnorm == "sync" and hw.dist.on:
        bb.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(bb.model)
    bb.model.to(hw.device)
    if cfg.channels_last:
        bb.model.to(memory_format=torch.channels_last)
    runtime.depthwise_in_fp32(bb.model, hw.device, hw.precision)
    return ModelCard(cfg.model, bb.head, classes, pre, bb.build_kwargs, bb.weights, cfg.data,
                     cfg.strategy, hw.precision, task=cfg.task)


def _train(job: Job, out: Path, saved: dict[str, Any] | None, prints: torch.Tensor) -> TrainState:
    """The epochs; a fresh run out of memory in its first steps starts again in passes of half the
    images (batch, learning rate and so the optimizer steps stay what was asked for;
    only BatchNorm's batch statistics see the smaller passes)."""
    model, dist = job.bb.model, job.hw.dist
    initial = (None if saved is not None
               else {k: v.detach().clone() for k, v in model.state_dict().items()})
    retried = False
    while True:
        cfg, stage = job.cfg, job.stage
        steps, drop_last = engine.steps_per_epoch(len(stage.train), cfg.batch_size, dist)
        # BatchNorm trains on batch statistics
        if cfg.strategy != "linear" and cfg.batchnorm != "frozen":
            engine.check_passes(stage.runner, [] if stage.cached else list(job.plan.frozen_blocks),
                                cfg.batch_size,
                                0 if drop_last else len(stage.train) % cfg.batch_size,
                                stage.micro, dist, retried)
        state = start_state(job, out, saved, prints, steps)
        try:
            with runtime.stop_on_signals(repeat_window=2.0 if dist.on else 0.0) as stop:
                epochs(job, out, state, steps, drop_last, stop)
            return state
        except torch.OutOfMemoryError:
            why = ("it was resumed" if initial is None
                   else "torchrun's processes would have to agree" if dist.on
                   else "it got past its first steps" if state.steps_taken > 10 else None)
            micro = engine.smaller_passes(stage.micro, cfg.batch_size, job.plan.image_size, why,
                                          job.hw.device)
            job.cfg = cfg.replace(micro_batch=micro)
            job.stage = replace(stage, micro=micro,
                                eval_batch=engine.eval_batch_for(cfg.batch_size, dist, micro))
            log.warning("out of memory: retrying from the start in passes of %d images (batch %d "
                        "and lr unchanged; recorded in %s)", micro, cfg.batch_size,
                        out / runfiles.CONFIG)
            atomic_write(out / runfiles.CONFIG,
                         job.cfg.to_yaml(requested_from(out / runfiles.CONFIG)))
            model.load_state_dict(initial)
            retried = True


def _final_evaluation(job: Job, out: Path, state: TrainState) -> RunResult:
    """The selected weights, read back from disk
    (what is evaluated is what was shipped), on the test split once."""
    cfg, stage, data, card, hw = job.cfg, job.stage, job.data, job.card, job.hw
    best = load_model_state(out, read_card(out)) if hw.dist.main else None
    state.model.load_state_dict(hw.dist.share(best))  # rank 0's disk alone may hold them
    temperature = _calibrate(job, out) if cfg.calibrate else 1.0
    thresholds = _thresholds(job, out) if card.task == task.MULTILABEL else None
    final, staged = (data.test, stage.test) if data.test is not None else (data.val, stage.val)
    unread: list[tuple[str, str]] = []  # files that went since the run started: never scored
    run = dict(device=hw.device, precision=hw.precision, tta=cfg.tta, dist=hw.dist,
               workers=cfg.workers, unread=unread, task=task_of(card))
    # cached features hold one view: the mirror image needs the whole model
    if cfg.tta and stage.cached:
        micro = engine.micro_batch_for(cfg.micro_batch, hw.device, card.preprocessing.image_size)
        logits, labels = engine.evaluate(state.model, final,
                                         EvalTransform(card.preprocessing, cfg.channels_last),
                                         batch_size=engine.eval_batch_for(cfg.batch_size, hw.dist,
                                                                          micro),
                                         **run)
        staged = None  # the images themselves ran, not their staged features
    else:
        logits, labels = engine.evaluate(stage.runner, staged, stage.eval_tf,
                                         batch_size=stage.eval_batch, **run)
    final, left_out = held_out_read(job, out, final, staged, unread)
    metrics = task_of(card).metrics(logits, labels, data.classes, thresholds)
    if task_of(card).multilabel:
        metrics["thresholds_chosen_on"] = "validation" if stage.val is not None else None
    else:
        metrics["calibration"] = calibration.summary(logits, labels, temperature)
    note = "; ".join(filter(None, (left_out, "" if data.test is not None else
                                   "no test split: the validation split, also used for model "
                                   "selection")))
    said = measured_on(final, cfg.data, card.preprocessing.image_size, tta=cfg.tta, note=note)
    if hw.dist.main:
        title = f"{cfg.model} on {cfg.data}"
        # the probabilities predict gives: calibrated by --calibrate's temperature
        errors = write_errors(out, "report", logits / temperature, labels, final, data.classes,
                              card.preprocessing, title=title, thresholds=thresholds)
        setup = setup_section(cfg, card, state, data, hw, out, stage.cached)
        setup.update(unread_setup(state.history))
        report = write_report(out, metrics, title=title, measured_on=said, classes=data.classes,
                              setup=setup, history=state.history, errors=errors)
        log.info("report: %s", report)
    return RunResult(out, metrics, said, state.history, main=hw.dist.main)


def _thresholds(job: Job, out: Path) -> list[float] | None:
    """Multi-label: each label's threshold, the one that maximises its F1 on the validation split,
    in model.json (None without one: 0.5 each)."""
    stage, hw, card = job.stage, job.hw, job.card
    if stage.val is None:
        log.info("no validation split: every label's threshold is %g",
                 multilabel.DEFAULT_THRESHOLD)
        return None
    logits, labels = engine.evaluate(stage.runner, stage.val, stage.eval_tf,
                                     batch_size=stage.eval_batch, device=hw.device,
                                     precision=hw.precision, dist=hw.dist,
                                     workers=job.cfg.workers, task=task_of(card))
    chosen = multilabel.choose_thresholds(logits, labels, card.classes)
    named = list(zip(card.classes, chosen))[:multilabel.NAMED]
    log.info("thresholds chosen on the validation split to maximise each label's F1: %s%s",
             ", ".join(f"{c} {t:.2f}" for c, t in named),
             " ..." if card.num_classes > len(named) else "")
    if hw.dist.main:
        update_card(out, thresholds=chosen)
    return chosen


def _calibrate(job: Job, out: Path) -> float:
    """--calibrate: the temperature that minimizes the selected model's NLL on the validation split,
    in model.json."""
    stage, hw = job.stage, job.hw
    logits, labels = engine.evaluate(stage.runner, stage.val, stage.eval_tf,
                                     batch_size=stage.eval_batch, device=hw.device,
                                     precision=hw.precision, dist=hw.dist, workers=job.cfg.workers)
    temperature = calibration.fit_temperature(logits, labels)
    if not temperature.note:  # else fit_temperature warned why T stays 1
        log.info("calibrated: temperature %.4g, validation NLL %.4f -> %.4f", temperature,
                 calibration.nll(logits, labels), calibration.nll(logits, labels, temperature))
    if hw.dist.main:
        update_card(out, temperature=temperature)
    return temperature
