"""The epoch loop: order the images, train one epoch,
validate, record, save. Read `epochs` first."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import models, runfiles
from ..checkpoint import MODEL_FILE, ModelCard, save_last, save_model
from ..config import TrainConfig
from ..data.folders import DataChanged, vanished, without_files
from ..data.mixing import Mixing
from ..data.sources import inverse_frequency
from ..data.splits import DataSource, Split
from ..data.transforms import batches
from ..errors import Interrupted
from ..logs import EpochProgress
from ..report import lr_range, write_metrics
from ..runtime import SINGLE, Compute, Dist, StopFlag
from ..task import Task, task_of
from . import engine
from .averaging import WeightAverage
from .features import Stage
from .plan import Plan, param_groups
from .runfolder import add_skipped, resume_command
from .state import Tally, TrainState, lr_factor, new_state
from .summary import val_line

log = logging.getLogger(__name__)

CHECKPOINT_MINUTES = 5  # mid-epoch checkpoints at least this often, besides --checkpoint-every


@dataclass
class Job:
    """A prepared run: its resolved settings, model and card,
    data, plan, stage and where it computes."""

    cfg: TrainConfig
    bb: models.Backbone
    card: ModelCard
    data: DataSource
    plan: Plan
    hw: Compute
    requested: dict[str, Any]  # what was asked for where it differs from what trains (config.yaml)
    stage: Stage | None = None  # built after the run folder is written (plan.build_stage)


def epochs(job: Job, out: Path, state: TrainState, steps: int, drop_last: bool,
           stop: StopFlag) -> None:
    """Train the remaining epochs; after each, validate, keep the best model and checkpoint."""
    cfg, stage, plan, dist = job.cfg, job.stage, job.plan, job.hw.dist
    setup = _announce(job, out, state, steps)
    averaged = None if state.ema is None else _runner_of(state.ema.module, job)
    draws = (balanced_draws(stage.train.labels, job.card.num_classes)
             if cfg.sampler == "balanced" else None)
    runner = torch.compile(stage.runner) if cfg.compile else stage.runner
    wrapped, trains = None, None
    for epoch in range(state.next_epoch, cfg.epochs + 1):
        if state.stopped_early(cfg.patience):  # also when resumed after the epoch that decided it
            log.info("early stop after epoch %d of %d: val %s has not improved by more than %g "
                     "for %d epochs (best: epoch %d)", state.history[-1]["epoch"], cfg.epochs,
                     cfg.select_by, cfg.min_delta, cfg.patience, state.best_epoch)
            break
        frozen = plan.backbone_frozen(epoch)
        models.set_trainable(state.model, job.card.head, not frozen, list(plan.frozen_blocks))
        if wrapped is None or (dist.on and frozen != trains):  # DDP syncs what trains when built
            wrapped, trains = dist.wrap(stage.runner, runner, cfg.compile, job.hw.device), frozen
        order = state.epoch_order(epoch, len(stage.train), draws)
        # mixing needs each row's partner, anywhere in the batch:
        # every process decodes the whole batch
        shard = dist.shard if dist.on and setup.mixing is None else None
        feed = Feed(len(stage.train), per_process=shard is not None)
        feed.batches = batches(stage.train, cfg.batch_size, order=order, start=state.step or 0,
                               drop_last=drop_last, workers=cfg.workers, share=shard,
                               unread=feed.unread, fill=True)
        tally = train_epoch(job, out, state, wrapped, feed, _sized(setup, job, epoch), epoch,
                            order, steps, stop)
        val_unread: list[tuple[str, str]] = []
        val = validate(job, state, runner if averaged is None else averaged, val_unread)
        left = _left_out(job, out, epoch, feed, val_unread)
        if left.get("val_unread") and (changed := vanished("validation", val_unread,
                                                           len(val_unread), len(stage.val))):
            _checkpoint(job, out, state, tally, epoch, steps, order)  # a resume validates again
            raise DataChanged(f"{changed}; {_resume_after_change(out, dist)}")
        row = {"epoch": epoch, **tally.summary(dist), **val, "backbone_frozen": frozen, **left}
        best = state.record(row, cfg.select_by, cfg.min_delta)
        log.info("epoch %d/%d  train_loss %.3f  %s  lr %s  %.0f s  %.0f img/s", epoch, cfg.epochs,
                 row["train_loss"], val_line(val, cfg.select_by), lr_range(row, "->"),
                 row["seconds"], row["img_per_s"])
        _save(job, out, state, epoch, val.get("val_acc"), best)
        if dist.sum(float(stop.requested))[0] > 0 and epoch < cfg.epochs:
            raise Interrupted(f"interrupted after epoch {epoch}; checkpoint saved. "
                              f"Resume with: {resume_command(out, dist)}", dist.main)


def start_state(job: Job, out: Path, saved: dict[str, Any] | None, prints: torch.Tensor,
               steps: int) -> TrainState:
    """A fresh TrainState over the run's parameter groups, or last.pt's when resuming."""
    cfg, model = job.cfg, job.bb.model
    state = new_state(model, param_groups(cfg, model, job.card.head), optimizer=cfg.optimizer,
                      lr=cfg.lr, momentum=cfg.momentum, schedule=cfg.schedule,
                      steps=steps * cfg.epochs, warmup_steps=round(cfg.warmup_epochs * steps),
                      seed=cfg.seed, device=job.hw.device)
    state.fingerprints = prints  # last.pt records what the run trains on and with
    state.ema = WeightAverage(model, cfg.ema) if cfg.ema else None
    if saved is not None:
        state.resume(saved, out / runfiles.LAST, seed=cfg.seed, dist=job.hw.dist)
        where = f"epoch {state.epoch}" + (
            "" if state.step is None else f", step {state.step}/{steps}")
        log.info("resuming %s after %s of %d epochs", out, where, cfg.epochs)
        _warn_if_schedule_ended(cfg, out, state, steps)
    return state


def _warn_if_schedule_ended(cfg: TrainConfig, out: Path, state: TrainState, steps: int) -> None:
    """--resume --epochs N past a finished cosine schedule stretches it: the added epochs train at a
    small lr."""
    group = state.optimizer.param_groups[0]
    if cfg.schedule == "constant" or state.epoch >= cfg.epochs or \
            group["lr"] > 1e-6 * group.get("initial_lr", 0):
        return
    peak = lr_factor(cfg.schedule, steps * cfg.epochs, round(cfg.warmup_epochs * steps))(
        state.scheduler.last_epoch)
    log.warning("its %s schedule had ended after epoch %d; stretched to %d epochs, the added ones "
                "train at %.0f%% of the peak lr and less. To train more on a full schedule, start "
                "a new run from its weights: transferkit train --weights %s ... (with the run's "
                "other settings)", cfg.schedule, state.epoch, cfg.epochs, 100 * peak,
                out / MODEL_FILE)


@dataclass
class Feed:
    """An epoch's training batches, and the files that could no longer be read: each is left out
    of the epoch (its place in the batch taken by another image of the batch: FileImages.batch)."""

    images: int  # in the training split
    per_process: bool  # each process read its own share of a batch: the counts add up
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = ()
    unread: list[tuple[str, str]] = field(default_factory=list)  # (path, why), this process's

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.batches:
            if not len(labels):  # every process finds that none of the batch reads
                raise DataChanged(vanished("training", self.unread, len(self.unread), self.images,
                                           share=0))
            yield images, labels

    def vanished(self, counted: torch.Tensor) -> str | None:
        """The sentence that stops the run when too many files went (`counted`: summed over the
        processes), else None."""
        count = int(counted) if self.per_process else len(self.unread)
        return vanished("training", self.unread, count, self.images)


def train_epoch(job: Job, out: Path, state: TrainState, model: torch.nn.Module, feed: Feed,
                setup: engine.StepSetup, epoch: int, order: torch.Tensor, steps: int,
                stop: StopFlag) -> Tally:
    """One epoch's steps (from a resumed position);
    a checkpoint when due, at a stop, every N steps, or when the data changed under the run."""
    cfg, dist = job.cfg, job.hw.dist
    start = done = state.step or 0
    tally = _tally(state, dist, start)  # sums over all ranks
    progress = EpochProgress(f"epoch {epoch}/{cfg.epochs}", steps, start, show=dist.main,
                             log_every=cfg.log_every, world=dist.world)
    # lr: what the coming step uses
    last_save, lr = time.monotonic(), state.optimizer.param_groups[0]["lr"]
    try:
        for fig in engine.train_one_epoch(model, state.optimizer, state.scheduler, feed, setup,
                                          state.augment, start):
            tally.add(fig.loss, fig.correct, fig.images, lr)
            state.steps_taken, done = state.steps_taken + 1, fig.step
            if state.ema is not None:
                state.ema.update(state.model)
            lr = state.optimizer.param_groups[0]["lr"]
            if progress.step(fig.step, fig.loss, fig.images, tally):  # every 20 steps
                tally.check_finite(dist, fig.step, lr)
            due = (cfg.checkpoint_every and fig.step % cfg.checkpoint_every == 0) or (
                time.monotonic() - last_save > 60 * CHECKPOINT_MINUTES)
            # Every process takes the same decision: a checkpoint's sums are collected from all.
            due, stopping, lost = dist.sum(float(due), float(stop.requested),
                                           float(len(feed.unread)))
            due, stopping, changed = due > 0, stopping > 0, feed.vanished(lost)
            if changed:
                raise DataChanged(changed)
            if (due or stopping) and fig.step < steps:
                _checkpoint(job, out, state, tally, epoch, fig.step, order)
                last_save = time.monotonic()
            if stopping and fig.step < steps:
                raise Interrupted(f"interrupted at epoch {epoch}, step {fig.step}/{steps}; "
                                  f"checkpoint saved. Resume with: {resume_command(out, dist)}",
                                  dist.main)
    except DataChanged as e:  # every process stops at the same step: the same checkpoint
        _checkpoint(job, out, state, tally, epoch, done, order)
        record_unread(job, out, epoch, "training", _all_processes(feed, dist))
        raise DataChanged(f"{e}; {_resume_after_change(out, dist)}") from None
    progress.close()
    tally.stop()
    tally.check_finite(dist, steps, lr)
    return tally


def _tally(state: TrainState, dist: Dist, start: int) -> Tally:
    """The epoch's running sums: carried on from last.pt when resuming mid-epoch (rank 0)."""
    tally = Tally.from_state_dict(state.running if dist.main and start else None)
    if start and tally.lr_start is None:  # a last.pt of an earlier version: the schedule says it
        sched = state.scheduler
        tally.lr_start = sched.base_lrs[0] * sched.lr_lambdas[0](sched.last_epoch - start)
    return tally


def _checkpoint(job: Job, out: Path, state: TrainState, tally: Tally, epoch: int, step: int,
                order: torch.Tensor) -> None:
    """last.pt after `step` steps of `epoch` (every process collects the sums; rank 0 writes)."""
    dist = job.hw.dist
    tally.check_finite(dist, step, state.optimizer.param_groups[0]["lr"])
    state.epoch, state.step, state.order = epoch, step, order
    state.running = tally.state_dict(dist)
    if dist.main:
        save_last(out, state.state_dict())


def _resume_after_change(out: Path, dist: Dist) -> str:
    return (f"{out / runfiles.LAST} is saved: put the files (or the folder's name) back, then "
            f"resume with: {resume_command(out, dist)}")


def _all_processes(feed: Feed, dist: Dist) -> list[tuple[str, str]]:
    """The epoch's unread training files, of every process (each read its own share)."""
    if not (dist.on and feed.per_process):
        return list(feed.unread)
    parts: list[Any] = [None] * dist.world
    torch.distributed.all_gather_object(parts, feed.unread)
    return sorted({f: why for part in parts for f, why in part}.items())


def _left_out(job: Job, out: Path, epoch: int, feed: Feed,
              val_unread: list[tuple[str, str]]) -> dict[str, int]:
    """The epoch's files that could no longer be read: in skipped.txt, one line of the log, and
    their counts for the epoch's row (none when every file read)."""
    train = _all_processes(feed, job.hw.dist)
    record_unread(job, out, epoch, "training", train)
    record_unread(job, out, epoch, "validation", val_unread)
    return {k: len(v) for k, v in (("train_unread", train), ("val_unread", val_unread)) if v}


def record_unread(job: Job, out: Path, epoch: int | str, word: str,
                   unread: list[tuple[str, str]]) -> None:
    """Files that could no longer be read, added to skipped.txt (rank 0), and said once."""
    if not unread:
        return
    when = f"epoch {epoch}" if isinstance(epoch, int) else epoch
    log.warning("%s: left out %d %s image(s) that could no longer be read, e.g. %s (%s); "
                "listed in %s", when, len(unread), word, *unread[0], out / runfiles.SKIPPED)
    if job.hw.dist.main:
        add_skipped(out, [(f, f"{why} (could no longer be read: {word}, {when})")
                          for f, why in unread])


def held_out_read(job: Job, out: Path, final: Split, staged: Split | None,
                  unread: list[tuple[str, str]]) -> tuple[Split, str]:
    """The held-out split as it was scored (`staged`: what ran, None where `final` itself ran;
    `unread`: the files that could no longer be read), and the words for what was left out; the
    run stops when more than VANISHED_SHARE of it went."""
    # its features left some out
    if staged is not None and staged.files is not None and len(staged) < len(final):
        kept = set(staged.files)
        unread = unread + [(f, "could not be read for its features") for f in final.files or []
                           if f not in kept and f not in dict(unread)]
    if not unread:
        return final, ""
    word = "test" if final.name == "test" else "validation"
    record_unread(job, out, "the final evaluation", word, unread)
    if changed := vanished(word, unread, len(unread), len(final)):
        raise DataChanged(f"{changed}; the trained model is saved: put the files back, then "
                          f"resume with: {resume_command(out, job.hw.dist)} (it evaluates "
                          "again)")
    return without_files(final, unread), (f"{len(unread)} that could no longer be read left "
                                          "out, listed in skipped.txt")


def unread_setup(history: list[dict[str, Any]]) -> dict[str, str]:
    """The report's Setup line on the epochs' images that could no longer be read (none when
    every file read)."""
    rows = [f"epoch {h['epoch']}: {h.get('train_unread', 0)} training, "
            f"{h.get('val_unread', 0)} validation" for h in history
            if h.get("train_unread") or h.get("val_unread")]
    return {"left out": "; ".join(rows) + " image(s) that could no longer be read during the run "
            "(never trained on or scored; listed in skipped.txt)"} if rows else {}


def validate(job: Job, state: TrainState, runner: torch.nn.Module,
             unread: list[tuple[str, str]] | None = None) -> dict[str, float | None]:
    """The epoch row's validation figures (all None without a validation split); files that could
    no longer be read are left out, and added to `unread`."""
    stage, hw = job.stage, job.hw
    hw.dist.sync_buffers(stage.runner)  # each process's last step moved its own statistics
    if state.ema is not None:
        hw.dist.sync_buffers(state.ema.module)  # ... and so their averages
    if stage.val is None:
        return task_of(job.card).no_val_figures()
    logits, labels = engine.evaluate(runner, stage.val, stage.eval_tf, batch_size=stage.eval_batch,
                                     device=hw.device, precision=hw.precision, dist=hw.dist,
                                     workers=job.cfg.workers, unread=unread, task=task_of(job.card))
    return task_of(job.card).val_figures(logits, labels, job.card.classes)


def _save(job: Job, out: Path, state: TrainState, epoch: int, val_acc: float | None,
          best: bool) -> None:
    """metrics.jsonl, the model when this epoch is the best so far, then last.pt (rank 0 alone)."""
    if not job.hw.dist.main:
        return
    write_metrics(out, state.history)
    if best:
        shipped = state.model if state.ema is None else state.ema.module
        save_model(out, shipped, job.card.replace(best_epoch=epoch, val_acc=val_acc,
                                                  epochs_trained=epoch,
                                                  batch_size=job.cfg.batch_size))
    save_last(out, state.state_dict())


def _announce(job: Job, out: Path, state: TrainState, steps: int) -> engine.StepSetup:
    """Log what the epochs will do; the training step's settings."""
    cfg, stage, hw = job.cfg, job.stage, job.hw
    if hw.dist.main:  # rows written after the checkpoint (a crash between the two) are dropped
        write_metrics(out, state.history)
    share = -(-cfg.batch_size // hw.dist.world)
    passes = "" if not stage.micro or stage.micro >= share else f" in passes of up to {stage.micro}"
    log.info("training %d epochs x %d steps, batch %d%s, %s, %s on %s", cfg.epochs, steps,
             cfg.batch_size, passes, cfg.strategy, hw.precision, hw.device)
    if state.next_epoch > cfg.epochs:
        log.info("%s has trained all %d epochs: evaluating it again (resume with --epochs N to "
                 "train more)", out, cfg.epochs)
    mixing = Mixing(cfg.mixup, cfg.cutmix) if cfg.mixup or cfg.cutmix else None
    if mixing is not None:
        log.info("%s: train_acc counts an answer right when it is the label with the larger "
                 "share of each mixed image (multi-label: every label of that image)",
                 " + ".join(n for n in ("mixup", "cutmix") if getattr(cfg, n)))
    if state.ema is not None:
        log.info("validating and saving the weights' moving average (--ema %g)", cfg.ema)
    return step_setup(job, hw.dist, mixing)


def step_setup(job: Job, dist: Dist = SINGLE, mixing: Mixing | None = None) -> engine.StepSetup:
    """The training step's settings for the job's stage: transforms, passes, loss (label smoothing,
    --class-weights), BatchNorm mode; the epochs add the torchrun job and mixup/cutmix."""
    cfg, stage, hw = job.cfg, job.stage, job.hw
    weights = None if cfg.class_weights == "none" else \
        inverse_frequency(stage.train.labels, job.card.num_classes).to(hw.device)
    return engine.StepSetup(stage.train_tf, hw.device, hw.precision, stage.micro,
                            cfg.label_smoothing, weights, cfg.batchnorm, dist, mixing,
                            Task(job.card.task, cfg.multilabel_loss))


def _sized(setup: engine.StepSetup, job: Job, epoch: int) -> engine.StepSetup:
    """The step settings of `epoch`: --progressive trains early epochs at a smaller side."""
    size = job.plan.size(epoch)
    if not job.cfg.progressive:
        return setup
    if size != job.plan.image_size:
        log.info("epoch %d trains at %d px (--progressive %d)", epoch, size, job.cfg.progressive)
    return replace(setup, transform=job.stage.train_tf.resized(size))


def _runner_of(model: torch.nn.Module, job: Job) -> torch.nn.Module:
    """What of `model` (the averaged copy) runs on the stage's splits,
    as stage.runner does of the model."""
    if not job.plan.cached:
        return model
    if job.plan.on == "features":
        return model.get_submodule(job.card.head)
    return models.without(model, list(job.plan.frozen_blocks))


def balanced_draws(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """--sampler balanced: each image's weight,
    inverse to its class's size (every class equally likely)."""
    counts = torch.bincount(labels, minlength=classes).double()
    return (1.0 / counts.clamp(min=1))[labels]
