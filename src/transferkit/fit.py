"""The one place that sequences a training run. Read it top to bottom."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import calibration, engine, fingerprint, lr_find, models, runtime
from .averaging import WeightAverage
from .checkpoint import (
    META_FILE,
    MODEL_FILE,
    ModelCard,
    load_model_state,
    read_card,
    save_last,
    save_model,
    update_card,
)
from .config import AUTO_FINETUNE_FROM, RECIPE_MODELS, TrainConfig, requested_from
from .data import heldout, sources
from .data.mixing import Mixing
from .data.preprocess import Preprocessing, resolve_preprocessing
from .data.sources import DataSource
from .data.transforms import EvalTransform, TrainTransform, batches
from .error_analysis import write_errors
from .errors import Interrupted, TransferkitError
from .features import Stage, activations_fit, cached_stage, supports_feature_cache
from .files import atomic_write
from .layerwise import layer_decay_groups
from .logs import EpochProgress, run_logging
from .report import RunResult, classification_metrics, lr_range, measured_on, write_metrics, write_report
from .runfolder import UNCHECKED, begin_writing, resume_command, run_folder, settings_of
from .runtime import SINGLE, Dist, StopFlag
from .state import Tally, TrainState, lr_factor, new_state, selection_score

log = logging.getLogger(__name__)

CHECKPOINT_MINUTES = 5  # mid-epoch checkpoints at least this often, besides --checkpoint-every


def train(config: TrainConfig | None = None, *, resume: str | Path | None = None,
          overwrite: bool = False, **settings: Any) -> RunResult:
    """Train, select on validation, evaluate once on test, write the run folder.

    Under torchrun every process calls this with the same arguments; they train together
    (DistributedDataParallel) and rank 0 alone writes the run folder.
    """
    started = time.perf_counter()
    cfg = settings_of(config, resume, settings)
    with runtime.distributed(cfg.device) as (dist, device), run_logging(quiet=not dist.main) as log_to_file, \
            run_folder(cfg, resume, overwrite, dist) as run:
        if dist.main:
            log_to_file(Path(run.out) / "train.log")
        result = _run(run.cfg, Path(run.out), run.saved, run.replace, dist, device)
    result.seconds = time.perf_counter() - started
    return result


def find_lr(config: TrainConfig | None = None, *, steps: int = lr_find.STEPS, start_lr: float = lr_find.START_LR,
            end_lr: float | None = None, **settings: Any) -> lr_find.RangeTest:
    """`transferkit lr-find`: the LR range test with train's data, model, transforms, precision and parameter
    groups; writes lr_find.json and lr_find.png to --out (default runs/lr-find-<data>-<model>-<time>)."""
    cfg = settings_of(config, None, settings)
    lr_find.check_ramp(steps, start_lr, end_lr or lr_find.END_LR)
    out = Path(cfg.out or f"runs/lr-find-{Path(cfg.data).name or 'data'}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    with runtime.distributed(cfg.device) as (dist, device), run_logging(quiet=False):
        if dist.on:
            raise TransferkitError("lr-find runs in one process; start it without torchrun")
        sources.check_data_arg(cfg.data)  # a wrong --data is the first line the user sees
        precision = runtime.resolve_precision(cfg.precision, device)
        runtime.seed_everything(cfg.seed)
        bb = models.create_backbone(cfg.model, cfg.weights)
        pre = resolve_preprocessing(image_size=cfg.image_size, mean=cfg.mean, std=cfg.std, weights=bb.preprocessing)
        models.check_input_size(bb, pre.image_size)
        frozen_blocks = models.frozen_prefix(bb.model, bb.head, cfg.trainable_blocks) if cfg.trainable_blocks else []
        data = _load_data(cfg, pre)
        cfg = _auto_strategy(cfg, data, {})
        data.test = None  # the range test trains on train alone: no features of the test images
        card = _classifier(cfg, bb, pre, data.classes, precision, dist, device)
        stage = _plan_stage(cfg, bb, pre, frozen_blocks, data, precision, dist, device)
        found = _range_test(cfg, bb.model, stage, card, frozen_blocks, device, precision, steps=steps,
                            start_lr=start_lr, end_lr=end_lr)
        found.notes = {"model": cfg.model, "weights": bb.weights, "data": cfg.data, "strategy": cfg.strategy,
                       "image_size": pre.image_size, "optimizer": cfg.optimizer, "precision": precision,
                       "backbone_lr_mult": cfg.backbone_lr_mult}
        lr_find.write(out, found, f"{cfg.model} on {cfg.data}, {cfg.strategy}")
    return found


def _run(cfg: TrainConfig, out: Path, saved: dict[str, Any] | None, replace: bool, dist: Dist,
         device: torch.device) -> RunResult:
    """The steps of a run, in order."""
    sources.check_data_arg(cfg.data)  # a wrong --data is the first line the user sees
    precision = runtime.resolve_precision(cfg.precision, device)
    runtime.seed_everything(cfg.seed)
    if cfg.recipe:
        log.info("recipe '%s'", cfg.recipe)
    if dist.on:
        runtime.check_world(dist, device, cfg.batch_size, cfg.batchnorm)
    # Under torchrun the first process of each machine fetches weights and fills the caches; the others read them.
    with dist.local_main_first():
        bb = models.create_backbone(cfg.model, cfg.weights, image_size=cfg.image_size)
        pre = resolve_preprocessing(image_size=cfg.image_size, mean=cfg.mean, std=cfg.std, weights=bb.preprocessing)
        models.check_input_size(bb, pre.image_size)
        _check_progressive(cfg, bb, pre.image_size)
        frozen_blocks = models.frozen_prefix(bb.model, bb.head, cfg.trainable_blocks) if cfg.trainable_blocks else []
        log.info("model %s, weights %s, input %dpx, %s", cfg.model, bb.weights, pre.image_size, pre.normalization)
        if cfg.weights.lower() == "none" and cfg.strategy != "linear":
            log.info("random weights: the backbone learns at %g x the head's lr (--backbone-lr-mult)",
                     cfg.backbone_lr_mult)
        cfg, requested = _resolved(cfg, bb, pre, out, saved)
        data = _load_data(cfg, pre)
        cfg = _auto_strategy(cfg, data, requested)
    listing, splits = fingerprint.data_listing(data, cfg.data), fingerprint.splits_of(data)
    recorded = None if saved is None else fingerprint.unpack(saved)
    if recorded is not None:  # a resume continues on the files it started with, or stops here
        fingerprint.check_data(recorded, listing, splits, cfg.data)
    card = _classifier(cfg, bb, pre, data.classes, precision, dist, device)
    if dist.main:
        begin_writing(out, cfg, replace, data.skipped, requested)
        heldout.write_split_record(out, cfg.data, data, val_split=cfg.val_split, seed=cfg.seed,
                                   max_train_images=cfg.max_train_images, dedupe=cfg.dedupe)
        if saved is not None and (out / META_FILE).is_file() and read_card(out).data != cfg.data:
            update_card(out, data=cfg.data)  # resumed on its moved data: eval finds it there
    stage = _plan_stage(cfg, bb, pre, frozen_blocks, data, precision, dist, device)
    if cfg.lr == "auto":  # before the fingerprint: a resume reads the resolved lr from config.yaml
        cfg = _auto_lr(cfg, out, bb.model, stage, card, frozen_blocks, dist, device, precision, requested)
    prints = fingerprint.pack({"settings": fingerprint.settings_of(cfg, UNCHECKED), "listing": listing,
                               "splits": splits})
    state, cfg = _train_retrying(cfg, out, bb.model, stage, card, saved, frozen_blocks, dist, device, precision,
                                 prints)
    return _final_evaluation(cfg, out, state, stage, data, card, dist, device, precision)


def _resolved(cfg: TrainConfig, bb: models.Backbone, pre: Preprocessing, out: Path,
              saved: dict[str, Any] | None) -> tuple[TrainConfig, dict[str, Any]]:
    """The settings as they train (the weights actually loaded, the preprocessing resolved from them), and
    what was asked for where it differs (a resumed run keeps what its config.yaml says was asked for)."""
    kind, _, name = bb.weights.partition(":")
    weights = {"torchvision": name.split(" (")[0], "file": name}.get(kind, cfg.weights)
    resolved = cfg.replace(weights=weights, image_size=pre.image_size, mean=pre.mean, std=pre.std)
    asked = {k: getattr(cfg, k) for k in ("weights", "image_size", "mean", "std") if getattr(cfg, k) !=
             getattr(resolved, k)}
    if saved is not None:
        asked = {**requested_from(out / "config.yaml"), **asked}
    return resolved, asked


def choose_strategy(cfg: TrainConfig, train_images: int) -> tuple[str, str]:
    """--strategy auto: the strategy for this training split, and why, in words for the log."""
    if cfg.strategy != "auto":
        return cfg.strategy, "asked for"
    if cfg.weights.lower() == "none":
        return "finetune", "random weights (--weights none) give no features to probe"
    needs_backbone = [flag for flag, on in (("--trainable-blocks", cfg.trainable_blocks is not None),
                                            ("--layer-decay", cfg.layer_decay != 1)) if on] + _image_options(cfg)
    if needs_backbone:
        return "finetune", f"{', '.join(needs_backbone)} train(s) the backbone on augmented images"
    if train_images < AUTO_FINETUNE_FROM:
        return "linear", (f"{train_images:,} training images, fewer than {AUTO_FINETUNE_FROM:,}: on this little "
                          "data the frozen pretrained features, probed on cached features, beat a full fine-tune "
                          "in a fraction of its time")
    return "finetune", f"{train_images:,} training images, {AUTO_FINETUNE_FROM:,} or more: a full fine-tune"


def _auto_strategy(cfg: TrainConfig, data: DataSource, requested: dict[str, Any]) -> TrainConfig:
    """Resolve --strategy auto by the training split; config.yaml keeps `auto` under requested:, so a resumed
    run goes on with what was chosen."""
    if cfg.strategy != "auto":
        return cfg
    strategy, why = choose_strategy(cfg, len(data.train))
    alternative = "--strategy finetune to train the whole network" if strategy == "linear" else \
        "--strategy linear for a probe on cached features"
    log.info("strategy %s (auto): %s; %s", strategy, why, alternative)
    requested["strategy"] = "auto"
    return cfg.replace(strategy=strategy)


def _load_data(cfg: TrainConfig, pre: Preprocessing) -> DataSource:
    """The splits (val carved from train when the data has none), with unreadable files listed."""
    src = sources.load_source(cfg.data, preprocessing=pre, data_dir=cfg.data_dir, splits=("train", "val", "test"),
                              workers=cfg.workers, max_train_images=cfg.max_train_images, seed=cfg.seed,
                              use_cache=cfg.cache, stream=cfg.stream)
    src.train, src.val, src.test = sources.train_val_test(src, cfg.val_split, cfg.seed)
    sources.check_leakage(src, dedupe=cfg.dedupe)  # after carving val: a copy inside train may now be on both sides
    calibration.check_calibration_split(cfg.calibrate, src.val, cfg.data)
    if len(src.classes) < 2:
        raise TransferkitError(f"{cfg.data} has one class ({src.classes[0]}); a classifier needs at least two")
    log.info("data %s: %d classes; train %s; val %s; test %s", cfg.data, len(src.classes),
             *("none" if s is None else s.description for s in (src.train, src.val, src.test)))
    if cfg.patience is not None and src.val is None:
        raise TransferkitError("--patience watches a validation metric, and this run has no validation split; use "
                               "--val-split 0.1 (or a val/ folder), or drop --patience")
    counts = torch.bincount(src.train.labels, minlength=len(src.classes))
    sources.warn_imbalance(counts, src.classes, cfg.class_weights, sampler=cfg.sampler, select_by=cfg.select_by)
    return src


def _classifier(cfg: TrainConfig, bb: models.Backbone, pre: Preprocessing, classes: list[str], precision: str,
                dist: Dist, device: torch.device) -> ModelCard:
    """Swap in the new head and place the model; returns the card that goes with its weights."""
    models.replace_head(bb.model, bb.head, len(classes))
    if dist.rank > 0:
        torch.manual_seed(runtime.rank_seed(cfg.seed, dist.rank))  # own dropout noise; weights come from rank 0
    if cfg.batchnorm == "sync" and dist.on:
        bb.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(bb.model)
    bb.model.to(device)
    if cfg.channels_last:
        bb.model.to(memory_format=torch.channels_last)
    runtime.depthwise_in_fp32(bb.model, device, precision)
    return ModelCard(cfg.model, bb.head, classes, pre, bb.build_kwargs, bb.weights, cfg.data, cfg.strategy,
                     precision)


def _plan_stage(cfg: TrainConfig, bb: models.Backbone, pre: Preprocessing, frozen_blocks: list[str], data: DataSource,
                precision: str, dist: Dist, device: torch.device) -> Stage:
    """The whole network on images, or (a frozen backbone, or frozen first blocks) the rest on cached features."""
    micro = engine.micro_batch_for(cfg.micro_batch, device, pre.image_size)
    train_tf = TrainTransform(pre, augment=cfg.augment, flip=cfg.flip, scale=(cfg.crop_scale, 1.0),
                              channels_last=cfg.channels_last, policy=cfg.augment_policy, erasing=cfg.random_erasing)
    stage = Stage(bb.model, data.train, data.val, data.test, train_tf, EvalTransform(pre, cfg.channels_last),
                  micro, engine.eval_batch_for(cfg.batch_size, dist, micro))
    linear = cfg.strategy == "linear" and cfg.feature_cache and supports_feature_cache(bb.model, bb.head)
    images = sum(len(s) for s in (data.train, data.val, data.test) if s is not None)
    trunk = bool(frozen_blocks) and cfg.feature_cache and models.caches_activations(bb.model) and activations_fit(
        bb.model, frozen_blocks[-1], pre.image_size, device, images)
    if frozen_blocks and not trunk:  # (the cached case says so below)
        log.info("training the last %d blocks and the head; the blocks up to %s stay frozen and run every step on the "
                 "augmented images", cfg.trainable_blocks, frozen_blocks[-1])
    if not (linear or trunk):
        return stage
    _check_uncached(cfg)
    if cfg.tta:  # the mirror image needs the whole model: the final evaluation reads the test images themselves
        stage = replace(stage, test=None)
    key = {"arch": cfg.model, "weights": bb.weights, "build": bb.build_kwargs, "preprocessing": pre.to_dict()}
    stage = cached_stage(stage, bb.model, bb.head, [] if linear else frozen_blocks, key, device=device,
                         precision=precision, use_cache=cfg.cache, dist=dist, workers=cfg.workers,
                         eval_batch=engine.eval_batch_for(cfg.batch_size, dist, None))
    if not linear:
        log.info("training the last %d blocks on cached activations of %s (one un-augmented view)",
                 cfg.trainable_blocks, frozen_blocks[-1])
    return stage


def _range_test(cfg: TrainConfig, model: torch.nn.Module, stage: Stage, card: ModelCard, frozen_blocks: list[str],
                device: torch.device, precision: str, **ramp: Any) -> lr_find.RangeTest:
    """The LR range test on what the run trains: its stage, transforms, passes, loss and parameter groups
    ('gradual': the whole network, which its lr drives after --head-epochs)."""
    trainable = [p.requires_grad for p in model.parameters()]
    models.set_trainable(model, card.head, cfg.strategy != "linear", frozen_blocks)
    weights = None if cfg.class_weights == "none" else sources.inverse_frequency(stage.train.labels, card.num_classes)
    setup = engine.StepSetup(stage.train_tf, device, precision, stage.micro, cfg.label_smoothing,
                             None if weights is None else weights.to(device), cfg.batchnorm)
    groups = _param_groups(cfg.replace(lr=1.0), model, card.head)  # the ramp scales them (--layer-decay too)
    end = ramp.pop("end_lr", None) or max(lr_find.END_LR, 10 * cfg.lr if cfg.lr != "auto" else 0)
    steps, _ = engine.steps_per_epoch(len(stage.train), cfg.batch_size, SINGLE)
    mean = lr_find.schedule_mean(cfg.schedule, steps * cfg.epochs, round(cfg.warmup_epochs * steps))
    try:
        return lr_find.range_test(model, stage.runner, groups, stage.train, setup, optimizer=cfg.optimizer,
                                  momentum=cfg.momentum, batch_size=cfg.batch_size, seed=cfg.seed, end_lr=end,
                                  schedule_mean=mean, **ramp)
    finally:
        for p, flag in zip(model.parameters(), trainable):
            p.requires_grad_(flag)


def _auto_lr(cfg: TrainConfig, out: Path, model: torch.nn.Module, stage: Stage, card: ModelCard,
             frozen_blocks: list[str], dist: Dist, device: torch.device, precision: str,
             requested: dict[str, Any]) -> TrainConfig:
    """--lr auto: the range test's suggestion (rank 0 runs it, every process trains at it), in config.yaml
    (what was asked for, 'auto', under requested:)."""
    if dist.on and cfg.batchnorm == "sync":  # SyncBatchNorm in rank 0's test would wait for the other processes
        raise TransferkitError("--lr auto with --batchnorm sync under torchrun: run 'transferkit lr-find' with the "
                               "same settings in one process first, then pass its suggestion as --lr")
    found, lr = None, None
    if dist.main:
        try:
            found = _range_test(cfg, model, stage, card, frozen_blocks, device, precision)
            lr = found.suggestion
        except lr_find.NoDescent as e:  # an lr to train at still beats no run: the default, said so
            lr = TrainConfig.__dataclass_fields__["lr"].default
            log.warning("--lr auto: %s; training at the default lr %g instead", e, lr)
    cfg = cfg.replace(lr=dist.share(lr))
    if found is not None:
        log.info("--lr auto: lr %.3g, the LR range test's suggestion (curve: %s)", cfg.lr, out / lr_find.PNG_FILE)
    requested["lr"] = "auto"
    if dist.main:
        if found is not None:
            lr_find.write(out, found, f"{cfg.model} on {cfg.data}, {cfg.strategy}")
        atomic_write(out / "config.yaml", cfg.to_yaml(requested))
    return cfg


def _train_retrying(cfg: TrainConfig, out: Path, model: torch.nn.Module, stage: Stage, card: ModelCard,
                    saved: dict[str, Any] | None, frozen_blocks: list[str], dist: Dist, device: torch.device,
                    precision: str, prints: torch.Tensor) -> tuple[TrainState, TrainConfig]:
    """The epochs; a fresh run out of memory in its first steps starts again in passes of half the images
    (batch, learning rate and so the optimizer steps stay what was asked for; only BatchNorm's batch
    statistics see the smaller passes)."""
    initial = None if saved is not None else {k: v.detach().clone() for k, v in model.state_dict().items()}
    retried = False
    while True:
        steps, drop_last = engine.steps_per_epoch(len(stage.train), cfg.batch_size, dist)
        if cfg.strategy != "linear" and cfg.batchnorm != "frozen":  # BatchNorm trains on batch statistics
            engine.check_passes(stage.runner, [] if stage.cached else frozen_blocks, cfg.batch_size,
                                0 if drop_last else len(stage.train) % cfg.batch_size, stage.micro, dist, retried)
        state = new_state(model, _param_groups(cfg, model, card.head),
                          optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, schedule=cfg.schedule,
                          steps=steps * cfg.epochs, warmup_steps=round(cfg.warmup_epochs * steps), seed=cfg.seed,
                          device=device)
        state.fingerprints = prints  # last.pt records what the run trains on and with
        state.ema = WeightAverage(model, cfg.ema) if cfg.ema else None
        if saved is not None:
            state.resume(saved, out / "last.pt", seed=cfg.seed, dist=dist)
            where = f"epoch {state.epoch}" + ("" if state.step is None else f", step {state.step}/{steps}")
            log.info("resuming %s after %s of %d epochs", out, where, cfg.epochs)
            _warn_if_schedule_ended(cfg, out, state, steps)
        try:
            with runtime.stop_on_signals(repeat_window=2.0 if dist.on else 0.0) as stop:
                _epochs(cfg, out, state, stage, card, frozen_blocks, steps, drop_last, dist, device, precision, stop)
            return state, cfg
        except torch.OutOfMemoryError:
            why = ("it was resumed" if initial is None else "torchrun's processes would have to agree" if dist.on
                   else "it got past its first steps" if state.steps_taken > 10 else None)
            micro = engine.smaller_passes(stage.micro, cfg.batch_size, card.preprocessing.image_size, why, device)
            cfg = cfg.replace(micro_batch=micro)
            stage = replace(stage, micro=micro, eval_batch=engine.eval_batch_for(cfg.batch_size, dist, micro))
            log.warning("out of memory: retrying from the start in passes of %d images (batch %d and lr unchanged; "
                        "recorded in %s)", micro, cfg.batch_size, out / "config.yaml")
            atomic_write(out / "config.yaml", cfg.to_yaml(requested_from(out / "config.yaml")))
            model.load_state_dict(initial)
            retried = True


def _epochs(cfg: TrainConfig, out: Path, state: TrainState, stage: Stage, card: ModelCard, frozen_blocks: list[str],
            steps: int, drop_last: bool, dist: Dist, device: torch.device, precision: str, stop: StopFlag) -> None:
    """Train the remaining epochs; after each, validate, keep the best model and checkpoint."""
    if dist.main:  # rows written after the checkpoint (a crash between the two) are dropped, not repeated
        write_metrics(out, state.history)
    share = -(-cfg.batch_size // dist.world)
    passes = "" if not stage.micro or stage.micro >= share else f" in passes of up to {stage.micro}"
    log.info("training %d epochs x %d steps, batch %d%s, %s, %s on %s", cfg.epochs, steps, cfg.batch_size,
             passes, cfg.strategy, precision, device)
    if state.next_epoch > cfg.epochs:
        log.info("%s has trained all %d epochs: evaluating it again (resume with --epochs N to train more)", out,
                 cfg.epochs)
    weights = None if cfg.class_weights == "none" else sources.inverse_frequency(stage.train.labels, card.num_classes)
    mixing = Mixing(cfg.mixup, cfg.cutmix) if cfg.mixup or cfg.cutmix else None
    setup = engine.StepSetup(stage.train_tf, device, precision, stage.micro, cfg.label_smoothing,
                             None if weights is None else weights.to(device), cfg.batchnorm, dist, mixing)
    if mixing is not None:
        log.info("%s: train_acc counts an answer right when it is the label with the larger share of each mixed "
                 "image", " + ".join(n for n in ("mixup", "cutmix") if getattr(cfg, n)))
    averaged = None if state.ema is None else _runner_of(state.ema.module, cfg, card.head, stage, frozen_blocks)
    if state.ema is not None:
        log.info("validating and saving the weights' moving average (--ema %g)", cfg.ema)
    draws = balanced_draws(stage.train.labels, card.num_classes) if cfg.sampler == "balanced" else None
    runner = torch.compile(stage.runner) if cfg.compile else stage.runner
    wrapped, trains = None, None
    for epoch in range(state.next_epoch, cfg.epochs + 1):
        if _stopped_early(cfg, state):  # also when resumed after the epoch that decided it
            log.info("early stop after epoch %d of %d: val %s has not improved by more than %g for %d epochs "
                     "(best: epoch %d)", state.history[-1]["epoch"], cfg.epochs, cfg.select_by, cfg.min_delta,
                     cfg.patience, state.best_epoch)
            break
        frozen = cfg.strategy == "linear" or (cfg.strategy == "gradual" and epoch <= cfg.head_epochs)
        models.set_trainable(state.model, card.head, not frozen, frozen_blocks)
        if wrapped is None or (dist.on and frozen != trains):  # DDP syncs the parameters that train when built
            wrapped, trains = dist.wrap(stage.runner, runner, cfg.compile, device), frozen
        order = state.epoch_order(epoch, len(stage.train), draws)
        # mixing needs each row's partner, anywhere in the batch: every process decodes the whole batch
        loader = batches(stage.train, cfg.batch_size, order=order, start=state.step or 0, drop_last=drop_last,
                         workers=cfg.workers, share=dist.shard if dist.on and mixing is None else None)
        size = progressive_size(epoch, cfg.epochs, cfg.progressive, card.preprocessing.image_size)
        if size != card.preprocessing.image_size:
            log.info("epoch %d trains at %d px (--progressive %d)", epoch, size, cfg.progressive)
        epoch_setup = replace(setup, transform=stage.train_tf.resized(size)) if cfg.progressive else setup
        tally = _train_epoch(cfg, out, state, wrapped, loader, epoch_setup, epoch, order, steps, dist, stop)
        dist.sync_buffers(stage.runner)  # each process's last step moved its own statistics
        if state.ema is not None:
            dist.sync_buffers(state.ema.module)  # ... and so their averages
        val = dict.fromkeys(("val_acc", "val_balanced_acc", "val_macro_f1", "val_loss"))
        if stage.val is not None:
            logits, labels = engine.evaluate(runner if averaged is None else averaged, stage.val, stage.eval_tf,
                                             batch_size=stage.eval_batch,
                                             device=device, precision=precision, dist=dist, workers=cfg.workers)
            val = _val_figures(logits, labels, card.classes)
        val_acc = val["val_acc"]
        row = {"epoch": epoch, **tally.summary(dist), **val, "backbone_frozen": frozen}
        best = state.record(row, cfg.select_by, cfg.min_delta)
        log.info("epoch %d/%d  train_loss %.3f  %s  lr %s  %.0f s  %.0f img/s", epoch, cfg.epochs,
                 row["train_loss"], _val_line(val, cfg.select_by), lr_range(row, "->"), row["seconds"],
                 row["img_per_s"])
        if dist.main:
            write_metrics(out, state.history)
            if best:
                shipped = state.model if state.ema is None else state.ema.module
                save_model(out, shipped, card.replace(best_epoch=epoch, val_acc=val_acc, epochs_trained=epoch,
                                                      batch_size=cfg.batch_size))
            save_last(out, state.state_dict())
        if dist.sum(float(stop.requested))[0] > 0 and epoch < cfg.epochs:
            raise Interrupted(f"interrupted after epoch {epoch}; checkpoint saved. "
                              f"Resume with: {resume_command(out, dist)}", dist.main)


def _warn_if_schedule_ended(cfg: TrainConfig, out: Path, state: TrainState, steps: int) -> None:
    """--resume --epochs N past a finished cosine schedule stretches it: the added epochs train at a small lr."""
    group = state.optimizer.param_groups[0]
    if cfg.schedule == "constant" or state.epoch >= cfg.epochs or group["lr"] > 1e-6 * group.get("initial_lr", 0):
        return
    peak = lr_factor(cfg.schedule, steps * cfg.epochs, round(cfg.warmup_epochs * steps))(state.scheduler.last_epoch)
    log.warning("its %s schedule had ended after epoch %d; stretched to %d epochs, the added ones train at %.0f%% "
                "of the peak lr and less. To train more on a full schedule, start a new run from its weights: "
                "transferkit train --weights %s ... (with the run's other settings)", cfg.schedule, state.epoch,
                cfg.epochs, 100 * peak, Path(out) / MODEL_FILE)


def progressive_size(epoch: int, epochs: int, start: int | None, size: int) -> int:
    """--progressive: the side epoch `epoch` of `epochs` trains at: `start` first, `size` last, in between
    the straight line rounded to a multiple of 32 px."""
    if start is None or epoch >= epochs:
        return size
    if epoch == 1:
        return start
    between = start + (size - start) * (epoch - 1) / (epochs - 1)
    return min(size, max(start, 32 * round(between / 32)))


def _check_progressive(cfg: TrainConfig, bb: models.Backbone, size: int) -> None:
    if cfg.progressive is None:
        return
    if cfg.progressive >= size:
        raise TransferkitError(f"--progressive {cfg.progressive} must be smaller than the input size ({size} px); "
                               "lower it or raise --image-size")
    if cfg.model.startswith(models.FIXED_SIZE):
        raise TransferkitError(f"{cfg.model} takes {size} px inputs only; --progressive needs a convolutional model "
                               "(resnet, mobilenet, efficientnet, convnext...)")
    models.check_side(cfg.model, cfg.progressive, size)


def _image_options(cfg: TrainConfig) -> list[str]:
    """The flags given that change the training images (beyond crop and flip), which cached features cannot."""
    return [flag for flag, on in (("--augment-policy", cfg.augment_policy != "none"),
                                  ("--random-erasing", cfg.random_erasing > 0), ("--mixup", cfg.mixup > 0),
                                  ("--cutmix", cfg.cutmix > 0), ("--progressive", cfg.progressive is not None))
            if on]


def _check_uncached(cfg: TrainConfig) -> None:
    """Refuse what transforms training images where training runs on cached features (there are none)."""
    asked = _image_options(cfg)
    if asked:
        raise TransferkitError(f"{', '.join(asked)} change(s) the training images, and this run trains on cached "
                               "features of them (--strategy linear or --trainable-blocks); add --no-feature-cache "
                               "to train on the images, or drop " + ", ".join(asked))


def _param_groups(cfg: TrainConfig, model: torch.nn.Module, head: str) -> list[dict]:
    """The optimizer's groups: head and backbone, or with --layer-decay one per backbone block."""
    if cfg.layer_decay == 1:
        return models.param_groups(model, head, cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay)
    try:
        blocks = models.block_names(model, head)
    except TransferkitError:
        raise TransferkitError(f"--layer-decay needs a backbone built from a sequence of blocks (ResNet, RegNet, "
                               f"MobileNet, EfficientNet, ConvNeXt...), not {type(model).__name__}; drop "
                               "--layer-decay") from None
    return layer_decay_groups(model, head, blocks, lr=cfg.lr,
                              backbone_lr_mult=cfg.backbone_lr_mult, layer_decay=cfg.layer_decay,
                              weight_decay=cfg.weight_decay)


def _augmentation(cfg: TrainConfig, cached: bool) -> str:
    """The report's line on what changed the training images (`cached`: nothing did, training read their features)."""
    if cached:
        return "none: trained on cached features of one un-augmented view (--no-feature-cache trains on the images)"
    parts = [f"random-resized crop (area >= {cfg.crop_scale:g})" + (" + flip" if cfg.flip else "")] if cfg.augment \
        else []
    parts += [cfg.augment_policy] if cfg.augment_policy != "none" else []
    parts += [f"random erasing p {cfg.random_erasing:g}"] if cfg.random_erasing else []
    parts += [f"{n} {getattr(cfg, n):g}" for n in ("mixup", "cutmix") if getattr(cfg, n)]
    parts += [f"progressive {cfg.progressive} px -> {cfg.image_size} px"] if cfg.progressive else []
    return ", ".join(parts) or "none"


def _runner_of(model: torch.nn.Module, cfg: TrainConfig, head: str, stage: Stage,
               frozen_blocks: list[str]) -> torch.nn.Module:
    """What of `model` (the averaged copy) runs on the stage's splits, as stage.runner does of the model."""
    if not stage.cached:
        return model
    return model.get_submodule(head) if cfg.strategy == "linear" else models.without(model, frozen_blocks)


def balanced_draws(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """--sampler balanced: each image's weight, inverse to its class's size (every class equally likely)."""
    counts = torch.bincount(labels, minlength=classes).double()
    return (1.0 / counts.clamp(min=1))[labels]


def _val_figures(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, float]:
    """The epoch row's validation figures: what --select-by can choose from."""
    m = classification_metrics(logits, labels, classes)
    loss = torch.nn.functional.cross_entropy(logits.float(), labels).item()  # plain NLL: no smoothing, no weights
    return {"val_acc": m["accuracy"], "val_balanced_acc": m["balanced_accuracy"], "val_macro_f1": m["macro_f1"],
            "val_loss": loss}


def _val_line(val: dict[str, float | None], select_by: str) -> str:
    """'val_acc 91.20%  val_bal_acc 88.10%' (and the selection metric where it is another)."""
    if val["val_acc"] is None:
        return "val_acc -"
    line = f"val_acc {100 * val['val_acc']:.2f}%  val_bal_acc {100 * val['val_balanced_acc']:.2f}%"
    if select_by == "macro-f1":
        line += f"  val_macro_f1 {100 * val['val_macro_f1']:.2f}%"
    elif select_by == "loss":
        line += f"  val_loss {val['val_loss']:.4f}"
    return line


def _stopped_early(cfg: TrainConfig, state: TrainState) -> bool:
    """--patience: the selection metric has not improved for that many finished epochs."""
    return cfg.patience is not None and state.epochs_without_gain() >= cfg.patience


def _train_epoch(cfg: TrainConfig, out: Path, state: TrainState, model: torch.nn.Module, loader,
                 setup: engine.StepSetup, epoch: int, order: torch.Tensor, steps: int, dist: Dist,
                 stop: StopFlag) -> Tally:
    """One epoch's steps (from a resumed position); a checkpoint when due, at a stop, or every N steps."""
    start = state.step or 0
    tally = Tally.from_state_dict(state.running if dist.main and start else None)  # sums over all ranks
    progress = EpochProgress(f"epoch {epoch}/{cfg.epochs}", steps, start, show=dist.main,
                             log_every=cfg.log_every, world=dist.world)
    last_save, lr = time.monotonic(), state.optimizer.param_groups[0]["lr"]  # lr: what the coming step uses
    for fig in engine.train_one_epoch(model, state.optimizer, state.scheduler, loader, setup, state.augment, start):
        tally.add(fig.loss, fig.correct, fig.images, lr)
        state.steps_taken += 1
        if state.ema is not None:
            state.ema.update(state.model)
        lr = state.optimizer.param_groups[0]["lr"]
        if progress.step(fig.step, fig.loss, fig.images, tally):  # every 20 steps, or --log-every
            tally.check_finite(dist, fig.step, lr)
        due = (cfg.checkpoint_every and fig.step % cfg.checkpoint_every == 0) or (
            time.monotonic() - last_save > 60 * CHECKPOINT_MINUTES)
        # Every process takes the same decision: a checkpoint's sums are collected from all.
        due, stopping = (bool(v > 0) for v in dist.sum(float(due), float(stop.requested)))
        if (due or stopping) and fig.step < steps:
            tally.check_finite(dist, fig.step, lr)
            state.epoch, state.step, state.order, state.running = epoch, fig.step, order, tally.state_dict(dist)
            if dist.main:
                save_last(out, state.state_dict())
            last_save = time.monotonic()
            if stopping:
                raise Interrupted(f"interrupted at epoch {epoch}, step {fig.step}/{steps}; checkpoint saved. "
                                  f"Resume with: {resume_command(out, dist)}", dist.main)
    progress.close()
    tally.stop()
    tally.check_finite(dist, steps, lr)
    return tally


def _final_evaluation(cfg: TrainConfig, out: Path, state: TrainState, stage: Stage, data: DataSource, card: ModelCard,
                      dist: Dist, device: torch.device, precision: str) -> RunResult:
    """The selected weights, read back from disk (what is evaluated is what was shipped), on the test split once."""
    best = load_model_state(out, read_card(out)) if dist.main else None
    state.model.load_state_dict(dist.share(best))  # rank 0's disk alone may hold them
    temperature = _calibrate(out, stage, dist, device, precision, cfg.workers) if cfg.calibrate else 1.0
    final, staged = (data.test, stage.test) if data.test is not None else (data.val, stage.val)
    run = dict(device=device, precision=precision, tta=cfg.tta, dist=dist, workers=cfg.workers)
    if cfg.tta and stage.cached:  # cached features hold one view: the mirror image needs the whole model
        micro = engine.micro_batch_for(cfg.micro_batch, device, card.preprocessing.image_size)
        logits, labels = engine.evaluate(state.model, final, EvalTransform(card.preprocessing, cfg.channels_last),
                                         batch_size=engine.eval_batch_for(cfg.batch_size, dist, micro), **run)
    else:
        logits, labels = engine.evaluate(stage.runner, staged, stage.eval_tf, batch_size=stage.eval_batch, **run)
    metrics = classification_metrics(logits, labels, data.classes)
    metrics["calibration"] = calibration.summary(logits, labels, temperature)
    size = card.preprocessing.image_size
    note = "" if data.test is not None else "no test split: the validation split, also used for model selection"
    said = measured_on(final, cfg.data, size, tta=cfg.tta, note=note)
    if dist.main:
        # the probabilities predict gives: calibrated by --calibrate's temperature
        errors = write_errors(out, "report", logits / temperature, labels, final, data.classes, card.preprocessing,
                              title=f"{cfg.model} on {cfg.data}")
        setup = _setup(cfg, card, state, data, dist, device, out, stage.cached)
        report = write_report(out, metrics, title=f"{cfg.model} on {cfg.data}", measured_on=said, classes=data.classes,
                              setup=setup, history=state.history, errors=errors)
        log.info("report: %s", report)
    return RunResult(out, metrics, said, state.history, main=dist.main)


def _calibrate(out: Path, stage: Stage, dist: Dist, device: torch.device, precision: str, workers: int) -> float:
    """--calibrate: the temperature that minimizes the selected model's NLL on the validation split, in model.json."""
    logits, labels = engine.evaluate(stage.runner, stage.val, stage.eval_tf, batch_size=stage.eval_batch,
                                     device=device, precision=precision, dist=dist, workers=workers)
    temperature = calibration.fit_temperature(logits, labels)
    log.info("calibrated: temperature %.4g, validation NLL %.4f -> %.4f", temperature,
             calibration.nll(logits, labels), calibration.nll(logits, labels, temperature))
    if dist.main:
        update_card(out, temperature=temperature)
    return temperature


def _strategy_line(cfg: TrainConfig, data: DataSource, out: Path) -> str:
    """The report's strategy: 'linear', 'finetune of the last K blocks ...', or with --strategy auto
    'linear (chosen by --strategy auto: why)'."""
    for_model = RECIPE_MODELS.get(cfg.recipe or "", {}).get(cfg.model, {})
    source = f", as in --recipe {cfg.recipe}" if for_model.get("trainable_blocks") == cfg.trainable_blocks else ""
    what = cfg.strategy + (f", the last {cfg.trainable_blocks} backbone blocks and the head (--trainable-blocks "
                           f"{cfg.trainable_blocks}{source})" if cfg.trainable_blocks else "")
    if requested_from(out / "config.yaml").get("strategy") != "auto":
        return what
    why = choose_strategy(cfg.replace(strategy="auto"), len(data.train))[1]
    return f"{what} (chosen by --strategy auto: {why})"


def _setup(cfg: TrainConfig, card: ModelCard, state: TrainState, data: DataSource, dist: Dist,
           device: torch.device, out: Path, cached: bool) -> dict[str, Any]:
    """The report's "Setup" section (`cached`: training ran on cached features)."""
    best = next((h for h in state.history if h["epoch"] == state.best_epoch), {})
    score = selection_score(best, cfg.select_by)
    shown = "" if score is None else f"{-score:.4f}" if cfg.select_by == "loss" else f"{100 * score:.2f}%"
    where = "" if data.val is None or not shown else f", val {cfg.select_by} {shown} on {len(data.val):,} images"
    last = state.history[-1]["epoch"] if state.history else 0
    early = (f"stopped early after epoch {last}: val {cfg.select_by} did not improve by more than {cfg.min_delta:g} "
             f"for {cfg.patience} epochs; " if _stopped_early(cfg, state) and last < cfg.epochs else "")
    return {
        "model": f"{cfg.model}, weights {card.weights}", "strategy": _strategy_line(cfg, data, out),
        "epochs": f"{cfg.epochs} ({early}selected: epoch {state.best_epoch}{where})",
        "sampler": "balanced (each class drawn equally often)" if cfg.sampler == "balanced" else "none (each image "
                   "once per epoch)",
        "train images": f"{len(data.train):,}", "optimizer": f"{cfg.optimizer}, lr {cfg.lr:g}, "
        f"backbone x{cfg.backbone_lr_mult:g}{f', layer decay {cfg.layer_decay:g}' if cfg.layer_decay != 1 else ''}, "
        f"{cfg.schedule}, label smoothing {cfg.label_smoothing:g}",
        "batch size": cfg.batch_size if not dist.on else f"{cfg.batch_size} ({dist.world} processes)",
        "precision": f"{card.precision} on {device}",
        "augmentation": _augmentation(cfg, cached),
        "weights averaged": f"exponential moving average, decay {cfg.ema:g} a step (--ema): validated and saved"
        if cfg.ema else "no",
        "test-time augmentation": "mirror image (--tta)" if cfg.tta else "none",
        "normalization": card.preprocessing.normalization,
        "recipe": cfg.recipe or "defaults",
    }
