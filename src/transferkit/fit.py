"""The one place that sequences a training run. Read it top to bottom."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision

from . import __version__, cache
from .checkpoint import (
    LAST_FILE,
    META_FILE,
    MODEL_FILE,
    atomic_write,
    load_last,
    load_model_state,
    save_last,
    save_model,
)
from .config import TrainConfig
from .data.images import resize_for
from .data.sources import DataSource, Split, Storage, check_data_arg, load_source, memory_bytes, stratified_split
from .data.transforms import BatchTransform, batches, num_batches
from .engine import predict_logits, train_one_epoch
from .errors import TransferkitError
from .features import Identity, features, supports_feature_cache
from .models import (
    check_input_size,
    create_backbone,
    frozen_prefix,
    param_groups,
    replace_head,
    set_trainable,
    without,
)
from .report import classification_metrics, write_report
from .runtime import Dist, resolve_precision, seed_everything, start_distributed, stop_distributed

log = logging.getLogger(__name__)

RESUMABLE_CHANGES = {"epochs", "device", "workers", "log_every", "compile", "checkpoint_every", "micro_batch", "tta"}
RUN_OUTPUTS = ("report*", "eval-*", "curves.png", "train.log")


@dataclass
class RunResult:
    """What a finished run measured and where it wrote it."""

    out_dir: Path
    metrics: dict[str, Any]  # on the test split (or val when the data has no test split)
    measured_on: str
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.metrics["accuracy"]


def train(config: TrainConfig | None = None, *, resume: str | Path | None = None,
          overwrite: bool = False, **settings: Any) -> RunResult:
    """Train, select on validation, evaluate once on test, write the run folder.

    Under torchrun every process calls this with the same arguments; they train together
    (DistributedDataParallel) and rank 0 alone writes the run folder.
    """
    started = time.perf_counter()
    if resume is not None:
        changed = sorted(set(settings) - RESUMABLE_CHANGES)
        if changed or config is not None:
            raise TransferkitError(
                f"--resume continues a run with its own config.yaml; only {', '.join(sorted(RESUMABLE_CHANGES))} "
                f"may change (not {', '.join(changed) or 'a new config'})"
            )
        if not (Path(resume) / "config.yaml").is_file():
            raise TransferkitError(f"nothing to resume in '{resume}': no config.yaml (is it a run folder?)")
        config = TrainConfig.from_yaml(Path(resume) / "config.yaml", **settings, out=str(resume))
    elif config is None:
        config = TrainConfig.create(**settings)
    elif settings:
        config = config.replace(**settings)

    dist, device = start_distributed(config.device)
    try:
        if not dist.main:
            logging.getLogger("transferkit").setLevel(logging.ERROR)  # other ranks: errors only
        # Rank 0 decides: the run folder, a fresh start or a resume, and the resumed state.
        decision: tuple = ("error", "rank 0 did not prepare the run")
        if dist.main:
            try:
                cfg, out, resuming = _prepare_run_folder(config, resume, overwrite, dist)
                decision = ("ok", cfg, str(out), load_last(out) if resuming else None)
            except TransferkitError as e:
                decision = ("error", str(e))
        decision = dist.share(decision)
        if decision[0] == "error":
            raise TransferkitError(decision[1])
        _, cfg, out, state = decision
        out = Path(out)
        file_log = _log_to_file(out / "train.log") if dist.main else None
        try:
            result = _run(cfg, out, state, dist, device)
        finally:
            if file_log is not None:
                logging.getLogger("transferkit").removeHandler(file_log)
                file_log.close()
    finally:
        stop_distributed(dist)
    result.seconds = time.perf_counter() - started
    return result


def _prepare_run_folder(cfg: TrainConfig, resume: str | Path | None, overwrite: bool,
                        dist: Dist) -> tuple[TrainConfig, Path, bool]:
    """Create (or check) the run folder; returns the config, the folder and whether to resume."""
    # Under torchrun the default name uses the job's run id, which a restarted worker sees again.
    stamp = os.environ.get("TORCHELASTIC_RUN_ID") if dist.on else None
    stamp = None if stamp == "none" else stamp  # torchrun's default without --rdzv-id / --standalone
    if dist.on and not cfg.out and not stamp and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        log.warning("no --out: a restarted worker will not find this run; give --out (or --rdzv-id)")
    out = Path(cfg.out or f"runs/{_data_name(cfg.data)}-{cfg.model}-{stamp or time.strftime('%Y%m%d-%H%M%S')}")
    resuming = resume is not None
    if not resuming and dist.restart > 0 and (out / LAST_FILE).exists():
        # torchrun restarted the workers after one died (--max-restarts): continue from last.pt.
        saved = TrainConfig.from_yaml(out / "config.yaml")
        keep = {k: getattr(cfg, k) for k in RESUMABLE_CHANGES}
        differs = [k for k in dataclasses.asdict(cfg)
                   if k not in keep and k != "out" and getattr(cfg, k) != getattr(saved, k)]
        if differs:
            raise TransferkitError(f"torchrun restart: {out} holds a run with other settings "
                                   f"({', '.join(differs)}); not resuming it")
        log.warning("torchrun restart %d: resuming from %s", dist.restart, out / LAST_FILE)
        return saved.replace(out=str(out), **keep), out, True
    if not resuming and (out / LAST_FILE).exists() and not overwrite:
        raise TransferkitError(
            f"{out} already holds a run; pass --resume {out} to continue it, --overwrite to "
            "replace it, or another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and not resuming:
        for old in [LAST_FILE, MODEL_FILE, META_FILE, "metrics.jsonl", "skipped.txt", *RUN_OUTPUTS]:
            for f in out.glob(old):
                f.unlink()
    return cfg.replace(out=str(out)), out, resuming


def _run(cfg: TrainConfig, out: Path, state: dict[str, Any] | None, dist: Dist,
         device: torch.device) -> RunResult:
    resuming = state is not None  # a bad checkpoint has stopped us before any heavy work
    if dist.main:
        atomic_write(out / "config.yaml", cfg.to_yaml())
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)
    if cfg.recipe:
        log.info("recipe '%s'", cfg.recipe)
    check_data_arg(cfg.data)
    if dist.on:
        _check_distributed(cfg, dist, device)

    # Backbone first: its weights decide the input size and normalization of the data. Under
    # torchrun the first process of each machine fetches weights and fills the caches; the
    # others then read them.
    with dist.local_main_first():
        bb = create_backbone(cfg.model, cfg.weights)
        size = cfg.image_size or bb.preprocessing.image_size
        check_input_size(bb, size)
        frozen_blocks = frozen_prefix(bb.model, bb.head, cfg.trainable_blocks) if cfg.trainable_blocks else []
        mean, std = cfg.mean or bb.preprocessing.mean, cfg.std or bb.preprocessing.std
        storage = Storage(size, resize_for(size, bb.preprocessing.crop_ratio))
        log.info("model %s, weights %s, input %dpx, mean %s std %s", cfg.model, bb.weights, size,
                 _fmt(mean), _fmt(std))
        src = load_source(cfg.data, storage=storage, data_dir=cfg.data_dir, splits=("train", "val", "test"),
                          workers=cfg.workers, max_train_images=cfg.max_train_images, seed=cfg.seed,
                          use_cache=cfg.cache, stream=cfg.stream)
    train_split, val_split, test_split = _splits(src, cfg)
    classes = src.classes
    if len(classes) < 2:
        raise TransferkitError(f"{cfg.data} has one class ({classes[0]}); a classifier needs at least two")
    if src.skipped and dist.main:
        atomic_write(out / "skipped.txt", "".join(f"{p}\t{r}\n" for p, r in src.skipped))
        log.warning("%d unreadable files skipped; list in %s", len(src.skipped), out / "skipped.txt")
    log.info("data %s: %d classes; train %s; val %s; test %s", cfg.data, len(classes),
             _describe(train_split), _describe(val_split), _describe(test_split))
    counts = torch.bincount(train_split.labels, minlength=len(classes))
    _warn_imbalance(counts, classes, cfg.class_weights)

    model = bb.model
    replace_head(model, bb.head, len(classes))
    if dist.rank > 0:
        torch.manual_seed(cfg.seed + 7919 * dist.rank)  # own dropout noise; weights come from rank 0
    if cfg.batchnorm == "sync" and dist.on:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    meta = {
        "format": 1, "arch": cfg.model, "num_classes": len(classes), "classes": classes,
        "head": bb.head, "build_kwargs": bb.build_kwargs, "image_size": size,
        "resize_size": storage.resize, "mean": list(mean), "std": list(std),
        "native_size": list(train_split.images.shape[-2:]), "weights": bb.weights, "data": cfg.data,
        "strategy": cfg.strategy, "precision": precision,
        "versions": {"transferkit": __version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "python": platform.python_version()},
    }
    train_tf = BatchTransform(size, mean, std, train=True, augment=cfg.augment, flip=cfg.flip,
                              scale=(cfg.crop_scale, 1.0), channels_last=cfg.channels_last)
    eval_tf = BatchTransform(size, mean, std, channels_last=cfg.channels_last)
    splits = (train_split, val_split, test_split)
    micro = micro_batch_for(cfg, device, size)
    eval_bs = _eval_batch(cfg, dist, micro)
    on_images = (eval_tf, eval_bs)  # the whole model on images: what mirror TTA needs after a feature cache
    runner = model  # what runs forward in training and evaluation
    linear_cache = cfg.strategy == "linear" and cfg.feature_cache and supports_feature_cache(model, bb.head)
    trunk_cache = bool(frozen_blocks) and cfg.feature_cache and _activations_fit(
        model, frozen_blocks[-1], size, device, sum(len(s) for s in splits if s is not None))
    if linear_cache or trunk_cache:
        # A frozen backbone (or frozen first blocks) maps each image to the same activations
        # every epoch: compute them once (un-augmented), cache them on disk, and train and
        # evaluate only the rest of the network on them.
        set_trainable(model, bb.head, not linear_cache, frozen_blocks)
        frozen_state = [v for k, v in model.state_dict().items()
                        if not k.startswith(bb.head + ".") and (linear_cache or k.startswith(
                            tuple(f"{f}." for f in frozen_blocks)))]
        identity = {"arch": cfg.model, "weights": bb.weights, "build": bb.build_kwargs, "size": size,
                    "mean": list(mean), "std": list(std), "storage": list(storage.__dict__.values()),
                    "frozen": cache.digest(*frozen_state)}
        at = None if linear_cache else frozen_blocks[-1]
        splits = tuple(None if s is None else features(
            model, bb.head, s, eval_tf, device=device, precision=precision, batch_size=eval_bs,
            identity=identity, use_cache=cfg.cache, dist=dist, at=at, workers=cfg.workers) for s in splits)
        runner = model.get_submodule(bb.head) if linear_cache else without(model, frozen_blocks)
        train_tf, eval_tf = Identity(), Identity()
        micro, eval_bs = None, _eval_batch(cfg, dist, None)  # the last layers alone: little memory
        if frozen_blocks:
            log.info("training the last %d blocks on cached activations of %s (one un-augmented view)",
                     cfg.trainable_blocks, frozen_blocks[-1])
    inverse_frequency = (counts.sum() / (len(classes) * counts.clamp(min=1))).float().to(device)
    loop = _Loop(cfg, out, model, runner, bb.head, device, precision, splits[0], splits[1], meta, train_tf,
                 eval_tf, dist, micro=micro, eval_bs=eval_bs, frozen_blocks=frozen_blocks,
                 class_weights=inverse_frequency if cfg.class_weights == "auto" else None)
    initial = None if resuming else {k: v.detach().clone() for k, v in model.state_dict().items()}
    while True:
        try:
            history, best_epoch, best_acc = loop.run(state)
            break
        except torch.OutOfMemoryError:
            # Only a fresh run that ran out of memory in its first steps retries, from its start.
            if initial is None or loop.steps_done > 10 or loop.cfg.batch_size < 2 or dist.on:
                raise TransferkitError(
                    f"out of memory with batch size {loop.cfg.batch_size}; lower --batch-size or --image-size"
                ) from None
            loop.cfg = loop.cfg.replace(batch_size=loop.cfg.batch_size // 2)
            log.warning("out of memory: retrying from the start with --batch-size %d (recorded in %s)",
                        loop.cfg.batch_size, out / "config.yaml")
            atomic_write(out / "config.yaml", loop.cfg.to_yaml())
            model.load_state_dict(initial)
    cfg = loop.cfg

    # The selected weights, read back from disk: what is evaluated is exactly what was shipped.
    # Under torchrun rank 0 reads them and hands them to the others (whose disk may not hold them).
    best = load_model_state(out, json.loads((out / META_FILE).read_text())) if dist.main else None
    model.load_state_dict(dist.share(best))
    which = 2 if test_split is not None else 1
    final = (train_split, val_split, test_split)[which]
    if cfg.tta and runner is not model:
        # Cached features hold one view of each image: the mirror needs the whole model on the images.
        logits, labels = _predict(model, final, *on_images, device, precision, dist, cfg.workers, flip=True)
    else:
        logits, labels = _predict(runner, splits[which], eval_tf, eval_bs, device, precision, dist, cfg.workers,
                                  flip=cfg.tta)
    metrics = classification_metrics(logits, labels, classes)
    measured_on = (f"{final.name} split of {cfg.data}, {len(final):,} images"
                   + ("" if final is test_split else " (no test split: the validation split, also used "
                      "for model selection)")
                   + f", stored at {final.resolution}, model input {size}x{size}"
                   + (", with its mirror image" if cfg.tta else ""))
    setup = {
        "model": f"{cfg.model}, weights {bb.weights}", "strategy": cfg.strategy,
        "epochs": f"{cfg.epochs} (selected: epoch {best_epoch}"
                  + (f", val acc {100 * best_acc:.2f}% on {len(val_split):,} images)" if val_split else ")"),
        "train images": f"{len(train_split):,}", "optimizer": f"{cfg.optimizer}, lr {cfg.lr:g}, "
        f"backbone x{cfg.backbone_lr_mult:g}, {cfg.schedule}, label smoothing {cfg.label_smoothing:g}",
        "batch size": cfg.batch_size if not dist.on else f"{cfg.batch_size} ({dist.world} processes)",
        "precision": f"{precision} on {device}",
        "test-time augmentation": "mirror image (--tta)" if cfg.tta else "none",
        "normalization": f"mean {_fmt(mean)} std {_fmt(std)}", "recipe": cfg.recipe or "defaults",
    }
    if dist.main:
        report = write_report(out, metrics, title=f"{cfg.model} on {cfg.data}", measured_on=measured_on,
                              classes=classes, setup=setup, history=history)
        log.info("report: %s", report)
    return RunResult(out, metrics, measured_on, history)


class Interrupted(TransferkitError):
    """Ctrl-C: the run stopped after a step and saved a checkpoint."""


class _Loop:
    """The epoch loop with its resumable state: everything last.pt holds, and nothing more."""

    def __init__(self, cfg, out, model, runner, head, device, precision, train_split, val_split, meta,
                 train_tf, eval_tf, dist, *, micro, eval_bs, frozen_blocks, class_weights) -> None:
        # `model` is what gets saved; `runner` what runs forward (the head alone on cached features).
        self.cfg, self.out, self.model, self.runner, self.head = cfg, out, model, runner, head
        self.device, self.precision = device, precision
        self.train_split, self.val_split, self.meta = train_split, val_split, meta
        self.train_tf, self.eval_tf, self.class_weights = train_tf, eval_tf, class_weights
        self.dist, self.micro, self.eval_bs, self.frozen_blocks = dist, micro, eval_bs, frozen_blocks
        self.steps_done = 0
        self.stop_requested = False

    def run(self, state: dict[str, Any] | None) -> tuple[list[dict[str, Any]], int, float]:
        cfg, model, dist = self.cfg, self.model, self.dist
        self.steps_done = 0
        compiled = torch.compile(self.runner) if cfg.compile else self.runner
        # A batch (or a process's share of it) of one image breaks BatchNorm: drop such a last batch.
        drop_last = 0 < len(self.train_split) % cfg.batch_size < 2 * dist.world
        steps = num_batches(len(self.train_split), cfg.batch_size, drop_last)
        if steps == 0:
            raise TransferkitError(
                f"the training split has {len(self.train_split)} images: too few for one batch shared by "
                f"{dist.world} processes (two images each); add images or use fewer processes"
            )
        optimizer = _optimizer(cfg, param_groups(model, self.head, cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _lr_factor(cfg.schedule, steps * cfg.epochs, round(cfg.warmup_epochs * steps))
        )
        shuffle_gen = torch.Generator().manual_seed(cfg.seed)
        aug_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        history: list[dict[str, Any]] = []
        best_acc, best_epoch, first_epoch, partial = -1.0, 0, 1, None
        if state is not None:
            try:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                shuffle_gen.set_state(state["shuffle_rng"])
                aug_gen.set_state(state["aug_rng"])
                if dist.main:
                    torch.set_rng_state(state["torch_rng"])
                else:  # fresh dropout noise for the other ranks: only rank 0's state is saved
                    torch.manual_seed(cfg.seed + 7919 * dist.rank + 104729 * state["epoch"])
            except (RuntimeError, KeyError, ValueError) as e:
                raise TransferkitError(
                    f"{self.out / LAST_FILE} does not fit this run's config.yaml ({type(e).__name__}: {e}); "
                    "was the config edited or the run moved to another device type? Start a new run instead."
                ) from None
            history = json.loads(state["history"])
            best_acc, best_epoch = state["best_acc"], state["best_epoch"]
            first_epoch = state["epoch"] + (state["step"] is None)
            partial = None if state["step"] is None else state
            where = f"epoch {state['epoch']}" + ("" if partial is None else f", step {state['step']}/{steps}")
            log.info("resuming %s after %s of %d epochs", self.out, where, cfg.epochs)
        # Rows written after the checkpoint (a crash between the two) are dropped, not repeated.
        if dist.main:
            _write_metrics(self.out, history)

        def checkpoint(epoch: int, step: int | None, **extra: Any) -> None:
            if not dist.main:
                return
            save_last(self.out, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step, "best_acc": best_acc,
                "best_epoch": best_epoch, "history": json.dumps(history), "shuffle_rng": shuffle_gen.get_state(),
                "aug_rng": aug_gen.get_state(), "torch_rng": torch.get_rng_state(), **extra,
            })

        share = -(-cfg.batch_size // dist.world)
        passes = "" if not self.micro or self.micro >= share else f" in passes of up to {self.micro}"
        log.info("training %d epochs x %d steps, batch %d%s, %s, %s on %s", cfg.epochs, steps, cfg.batch_size,
                 passes, cfg.strategy, self.precision, self.device)
        trains, wrapped = None, None
        with _first_sigint_stops(self):
            for epoch in range(first_epoch, cfg.epochs + 1):
                frozen = cfg.strategy == "linear" or (cfg.strategy == "gradual" and epoch <= cfg.head_epochs)
                set_trainable(model, self.head, not frozen, self.frozen_blocks)
                if wrapped is None or (dist.on and frozen != trains):
                    # DistributedDataParallel syncs the parameters that train when it is built.
                    wrapped, trains = self._wrap(compiled), frozen
                if partial is not None:  # the same image order, from the step after the checkpoint
                    order, start, running = partial["order"], partial["step"], partial["running"]
                    running = running if dist.main else None  # the saved sums are over all ranks
                    partial = None
                else:
                    order, start, running = torch.randperm(len(self.train_split), generator=shuffle_gen), 0, None
                last_save = time.monotonic()

                def after_step(step: int, snapshot, epoch=epoch, order=order) -> bool:
                    nonlocal last_save
                    self.steps_done += 1
                    due = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or (
                        time.monotonic() - last_save > 60 * CHECKPOINT_MINUTES)
                    # Every rank must take the same decision: a checkpoint's sums are collected from all.
                    due, stop = (bool(v > 0) for v in dist.sum(float(due), float(self.stop_requested)))
                    if (due or stop) and step < steps:
                        checkpoint(epoch, step, order=order, running=snapshot())
                        last_save = time.monotonic()
                    return stop

                stats = train_one_epoch(
                    wrapped, batches(self.train_split, cfg.batch_size, order=order, start=start, drop_last=drop_last,
                                     workers=cfg.workers, share=dist.shard if dist.on else None),
                    self.train_tf, optimizer, scheduler, device=self.device, precision=self.precision,
                    label_smoothing=cfg.label_smoothing, class_weights=self.class_weights, generator=aug_gen,
                    total=steps, start_step=start, running=running, log_every=cfg.log_every,
                    desc=f"epoch {epoch}/{cfg.epochs}", after_step=after_step, dist=dist,
                    batchnorm=cfg.batchnorm, micro_batch=self.micro,
                )
                if stats.get("stopped") and stats["step"] < steps:
                    raise Interrupted(
                        f"interrupted at epoch {epoch}, step {stats['step']}/{steps}; checkpoint saved. "
                        f"Resume with: {self._resume_command()}"
                    )
                val_acc = None
                dist.sync_buffers(self.runner)  # each process's last step moved its own statistics
                if self.val_split is not None:
                    logits, labels = _predict(compiled, self.val_split, self.eval_tf, self.eval_bs, self.device,
                                              self.precision, dist, cfg.workers)
                    val_acc = (logits.argmax(1) == labels).double().mean().item()
                row = {"epoch": epoch, "train_loss": stats["loss"], "train_acc": stats["acc"], "val_acc": val_acc,
                       "lr": optimizer.param_groups[0]["lr"], "seconds": stats["seconds"],
                       "img_per_s": stats["images"] / max(stats["seconds"], 1e-9), "backbone_frozen": frozen}
                history.append(row)
                if dist.main:
                    _write_metrics(self.out, history)
                log.info("epoch %d/%d  train_loss %.3f  val_acc %s  lr %.1e  %.0f s  %.0f img/s", epoch,
                         cfg.epochs, stats["loss"], f"{100 * val_acc:.2f}%" if val_acc is not None else "-",
                         row["lr"], stats["seconds"], row["img_per_s"])
                if val_acc is None or val_acc > best_acc:
                    best_acc, best_epoch = (val_acc if val_acc is not None else -1.0), epoch
                    if dist.main:
                            save_model(self.out, model, dict(self.meta, best_epoch=epoch, val_acc=val_acc,
                                                         epochs_trained=epoch, batch_size=cfg.batch_size))
                checkpoint(epoch, None)
                if dist.sum(float(self.stop_requested))[0] > 0 and epoch < cfg.epochs:
                    raise Interrupted(f"interrupted after epoch {epoch}; checkpoint saved. "
                                      f"Resume with: {self._resume_command()}")
        return history, best_epoch, best_acc

    def _resume_command(self) -> str:
        launch = f"torchrun --nproc_per_node={self.dist.world} -m transferkit" if self.dist.on else "transferkit"
        return f"{launch} train --resume {self.out}"

    def _wrap(self, compiled: torch.nn.Module) -> torch.nn.Module:
        """What runs forward in training: under torchrun, DistributedDataParallel around the runner."""
        if not self.dist.on:
            return compiled
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(self.runner, device_ids=ids)
        return torch.compile(ddp) if self.cfg.compile else ddp


CHECKPOINT_MINUTES = 5  # mid-epoch checkpoints at least this often, besides --checkpoint-every


@contextlib.contextmanager
def _first_sigint_stops(loop: _Loop):
    """First Ctrl-C (or SIGTERM, what torchrun and job schedulers send): finish the step, save,
    stop. A second one: stop at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    first = 0.0

    def handler(signum, frame):
        nonlocal first
        if loop.stop_requested:
            if time.monotonic() - first < 2:  # the same stop, delivered twice (terminal and torchrun)
                return
            raise KeyboardInterrupt
        loop.stop_requested, first = True, time.monotonic()
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        log.warning("%s: finishing this step and saving a checkpoint (again to abort now)", name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@torch.no_grad()
def _activations_fit(model: torch.nn.Module, at: str, size: int, device: torch.device, images: int) -> bool:
    """Whether the output of module `at` for all `images` fits in a quarter of this process's memory."""
    shape = []
    hook = model.get_submodule(at).register_forward_hook(lambda _m, _a, out: shape.append(out.shape))
    model.eval()
    try:
        model(torch.zeros(1, 3, size, size, device=device))
    finally:
        hook.remove()
    need = math.prod(shape[0]) * 4 * images
    if need > memory_bytes() / 4:
        log.warning("the frozen blocks' activations would take %.1f GB: running them every step instead of "
                    "caching them", need / 1e9)
        return False
    return True


def _check_distributed(cfg: TrainConfig, dist: Dist, device: torch.device) -> None:
    if cfg.batch_size < 2 * dist.world:
        raise TransferkitError(
            f"--batch-size {cfg.batch_size} is the global batch, shared by {dist.world} processes; it must be at "
            f"least {2 * dist.world} (two images per process)"
        )
    if cfg.batchnorm == "sync" and device.type != "cuda":
        raise TransferkitError("--batchnorm sync needs GPUs (NCCL); on CPUs use --batchnorm train or frozen")
    log.info("torchrun: %d processes, global batch %d (%s per process)", dist.world, cfg.batch_size,
             f"{cfg.batch_size // dist.world}" + ("" if cfg.batch_size % dist.world == 0 else "-"
                                                   f"{cfg.batch_size // dist.world + 1}"))


def micro_batch_for(cfg: TrainConfig, device: torch.device, size: int) -> int | None:
    """Images per forward/backward pass: --micro-batch, or on a CPU (auto) as many as keep the
    activations of 16 images at 224 px (a MobileNetV2/ResNet fine-tune then stays under 3 GB)."""
    if cfg.micro_batch:
        return cfg.micro_batch
    return max(1, int(CPU_PIXELS_PER_PASS / size**2)) if device.type == "cpu" else None


CPU_PIXELS_PER_PASS = 16 * 224 * 224


def _eval_batch(cfg: TrainConfig, dist: Dist, micro: int | None) -> int:
    """Evaluation keeps no activations for a backward pass: twice the training pass."""
    per_process = max(1, 2 * cfg.batch_size // dist.world)
    return per_process if micro is None else min(per_process, 2 * micro)


def _predict(runner, split: Split, transform, batch_size: int, device: torch.device, precision: str,
             dist: Dist, workers: int = 0, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a whole split; under torchrun each rank runs a share, all get all.
    `flip`: mirror test-time augmentation."""
    if not dist.on or len(split) < dist.world:
        return predict_logits(runner, batches(split, batch_size, workers=workers), transform, device=device,
                              precision=precision, desc=split.name, flip=flip)
    mine = split.subset(torch.arange(len(split))[dist.shard(len(split))])
    logits, labels = predict_logits(runner, batches(mine, batch_size, workers=workers), transform, device=device,
                                    precision=precision, desc=split.name, flip=flip)
    return dist.gather_rows(logits), dist.gather_rows(labels)


def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl, one line per finished epoch, rewritten whole so it always matches last.pt."""
    atomic_write(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def _optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _warn_imbalance(counts: torch.Tensor, classes: list[str], class_weights: str) -> None:
    small = [f"{classes[i]} ({int(n)})" for i, n in enumerate(counts) if n < SMALL_CLASS]
    if small:
        log.warning("very small classes in train: %s; their scores will be unreliable", ", ".join(small))
    ratio = counts.max().item() / max(1, counts.min().item())
    if ratio > IMBALANCE_RATIO and class_weights == "none":
        log.warning("heavy class imbalance (largest/smallest class %.0fx); consider --class-weights auto", ratio)


SMALL_CLASS = 10  # training images
IMBALANCE_RATIO = 10


def _splits(src: DataSource, cfg: TrainConfig) -> tuple[Split, Split | None, Split | None]:
    """train/val/test; val is carved from train (stratified, seeded) when the data has none."""
    if src.train is None:
        raise TransferkitError(f"{cfg.data} has no training images (expected a train/ folder or class folders)")
    train, val = src.train, src.val
    if val is None and cfg.val_split > 0:
        keep, held = stratified_split(train.labels, cfg.val_split, cfg.seed)
        if len(held) == 0:
            raise TransferkitError(
                f"{cfg.data} has too few images per class to hold out a validation split; add images, "
                "a val/ folder, or use --val-split 0 with a test/ folder"
            )
        train, val = train.subset(keep, "train"), train.subset(held, "val")
    if val is None and src.test is None:
        raise TransferkitError(
            f"{cfg.data} has no val/ or test/ split and --val-split is 0: nothing to evaluate on; "
            "set --val-split 0.1 or add a test/ folder"
        )
    return train, val, src.test


def _lr_factor(schedule: str, total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _data_name(data: str) -> str:
    return Path(data).name or "data"


def _describe(split: Split | None) -> str:
    return "none" if split is None else f"{len(split):,} images at {split.resolution}"


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def _log_to_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("transferkit")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler
