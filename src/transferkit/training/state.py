"""TrainState: everything a run needs to continue
exactly where it stopped, and what last.pt holds."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import TransferkitError
from ..runtime import Dist, rank_seed
from .averaging import WeightAverage


@dataclass
class Tally:
    """The running sums of an epoch on this process:
    loss (x images), correct answers, images, seconds."""

    loss: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    correct: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    images: int = 0
    seconds_before: float = 0.0  # of the part of the epoch before a resume
    started: float = field(default_factory=time.perf_counter)
    # when the epoch's last step ended (validation is not training time)
    stopped: float | None = None
    # the head's lr at the epoch's first step (kept across a resume) and at its last: one figure
    # would hide a schedule's whole epoch
    lr_start: float | None = None
    lr_end: float | None = None

    def add(self, loss: torch.Tensor, correct: torch.Tensor, images: int,
            lr: float | None = None) -> None:
        """Count one step's figures; `lr`: the learning rate that step used."""
        self.loss = self.loss.to(loss.device) + loss
        self.correct = self.correct.to(correct.device) + correct
        self.images += images
        if lr is not None:
            self.lr_start = lr if self.lr_start is None else self.lr_start
            self.lr_end = lr

    @property
    def seconds(self) -> float:
        return self.seconds_before + (self.stopped or time.perf_counter()) - self.started

    def stop(self) -> None:
        self.stopped = time.perf_counter()

    def totals(self, dist: Dist) -> tuple[float, int, int]:
        """(loss x images, correct, images) summed over all processes."""
        s, c, n = dist.sum(self.loss, self.correct, self.images)
        return s.item(), int(c), int(n)

    def summary(self, dist: Dist) -> dict[str, float]:
        """The epoch's train loss and accuracy over all processes,
        its first and last lr, seconds, images/s."""
        loss, correct, seen = self.totals(dist)
        return {"train_loss": loss / seen, "train_acc": correct / seen, "lr_start": self.lr_start,
                "lr_end": self.lr_end, "seconds": self.seconds,
                "img_per_s": seen / max(self.seconds, 1e-9)}

    def check_finite(self, dist: Dist, step: int, lr: float) -> None:
        """Stop every process together when the loss became NaN or infinite."""
        mine = not torch.isfinite(self.loss).all()
        if (dist.sum(float(mine))[0] > 0) if dist.on else mine:
            shown = self.loss.item() if mine else "non-finite in another process"
            raise NonFiniteLoss(f"loss became {shown} by step {step} (lr {lr:.2e}); the last good "
                                "checkpoint is kept. Lower --lr, or use --precision fp32")

    def state_dict(self, dist: Dist) -> dict[str, Any]:
        """The sums over all processes, as last.pt holds them (a resumed rank 0 carries them on)."""
        s, c, n = self.totals(dist)
        return {"loss_sum": torch.tensor(s, dtype=torch.float64), "correct": torch.tensor(c),
                "seen": n, "seconds": self.seconds, "lr_start": self.lr_start,
                "lr_end": self.lr_end}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any] | None) -> Tally:
        if d is None:
            return cls()
        # a last.pt from before has neither lr_start nor lr_end
        return cls(d["loss_sum"].clone(), d["correct"].clone(), int(d["seen"]), float(d["seconds"]),
                   lr_start=d.get("lr_start"), lr_end=d.get("lr_end"))


class NonFiniteLoss(TransferkitError):
    """The loss became NaN or infinite."""


@dataclass
class TrainState:
    """Model, optimizer, scheduler, random generators, history and best epoch of one run.

    `epoch` and `step` say where it stands: after `step` steps of epoch `epoch` (mid-epoch, with
    that epoch's image `order` and `running` sums), or at the end of epoch `epoch` (`step` None).
    """

    model: nn.Module  # the whole network: what is saved (its head alone trains on cached features)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    shuffle: torch.Generator  # the image order of each epoch
    augment: torch.Generator  # random crops and flips, on the training device
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    # of the selection metric (--select-by; the loss negated: higher is better)
    best_score: float = -math.inf
    epoch: int = 0
    step: int | None = None
    order: torch.Tensor | None = None
    running: dict[str, Any] | None = None
    steps_taken: int = 0  # in this process's session (not saved): how far a fresh run got
    # of the run's data and settings (fingerprint.pack), checked on resume
    fingerprints: torch.Tensor | None = None
    ema: WeightAverage | None = None  # --ema: the average that validates and is saved

    @property
    def next_epoch(self) -> int:
        return self.epoch + (self.step is None)

    def epoch_order(self, epoch: int, n: int, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The image order of `epoch`: the saved one when resuming in it, else a
        fresh shuffle, or with `weights` (one per image) n draws with replacement
        in proportion to them. Every process draws the same order from the same
        saved generator (then trains on its share of each batch)."""
        if self.step is not None and self.epoch == epoch:
            return self.order
        self.step = None
        if weights is not None:
            return torch.multinomial(weights, n, replacement=True, generator=self.shuffle)
        return torch.randperm(n, generator=self.shuffle)

    def record(self, row: dict[str, Any], select_by: str = "accuracy",
               min_delta: float = 0.0) -> bool:
        """Add an epoch's row to the history; True when it is the best so far:
        its `select_by` metric beats the best one by more than `min_delta` (every
        epoch is, without a validation split)."""
        self.history.append(row)
        self.epoch, self.step, self.order, self.running = row["epoch"], None, None, None
        score = selection_score(row, select_by)
        if score is None or score > self.best_score + min_delta:
            self.best_score, self.best_epoch = ((score if score is not None else -math.inf),
                                                row["epoch"])
            return True
        return False

    def epochs_without_gain(self) -> int:
        """Finished epochs since the best one (what --patience counts);
        derived from the history, so a resumed run counts on where it stopped."""
        return self.history[-1]["epoch"] - self.best_epoch if self.history else 0

    def stopped_early(self, patience: int | None) -> bool:
        """--patience: the selection metric has not improved for that many finished epochs."""
        return patience is not None and self.epochs_without_gain() >= patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
            "best_score": self.best_score, "best_epoch": self.best_epoch,
            "history": json.dumps(self.history),
            "shuffle_rng": self.shuffle.get_state(), "aug_rng": self.augment.get_state(),
            "torch_rng": torch.get_rng_state(),
            **({} if self.step is None else {"order": self.order, "running": self.running}),
            **({} if self.fingerprints is None else {"fingerprints": self.fingerprints}),
            **({} if self.ema is None else {"ema": self.ema.state_dict()}),
        }

    def resume(self, saved: dict[str, Any], source: Path, *, seed: int, dist: Dist) -> None:
        """Continue from last.pt's contents: rank 0 restores its dropout generator too,
        the others draw fresh noise of their own (only rank 0's is saved)."""
        try:
            self.load_state_dict(saved, global_rng=dist.main)
        except (RuntimeError, KeyError, ValueError) as e:
            raise TransferkitError(
                f"{source} does not fit this run's config.yaml ({type(e).__name__}: {e}); was the "
                "config edited or the run moved to another device type? Start a new run instead."
            ) from None
        if not dist.main:
            torch.manual_seed(rank_seed(seed, dist.rank, self.epoch))

    def load_state_dict(self, d: dict[str, Any], *, global_rng: bool = True) -> None:
        """Continue from `d`; `global_rng`:
        also restore torch's global generator (dropout), as rank 0 does."""
        self.model.load_state_dict(d["model"])
        self.optimizer.load_state_dict(d["optimizer"])
        self.scheduler.load_state_dict(d["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(d["ema"])
        self.shuffle.set_state(d["shuffle_rng"])
        self.augment.set_state(d["aug_rng"])
        if global_rng:
            torch.set_rng_state(d["torch_rng"])
        self.history = json.loads(d["history"])
        # best_acc: what a last.pt from before best_score holds
        self.best_score, self.best_epoch = (d.get("best_score", d.get("best_acc")),
                                            d["best_epoch"])
        self.epoch, self.step = d["epoch"], d["step"]
        self.order, self.running = d.get("order"), d.get("running")


# --select-by: the epoch row's figure it reads
SELECTION = {"accuracy": "val_acc", "balanced-accuracy": "val_balanced_acc",
             "macro-f1": "val_macro_f1", "loss": "val_loss", "map": "val_map"}


def selection_score(row: dict[str, Any], select_by: str) -> float | None:
    """The epoch's `select_by` figure, higher is better
    (the loss negated); None without validation."""
    value = row.get(SELECTION[select_by])
    return None if value is None else -value if select_by == "loss" else value


def new_state(model: nn.Module, groups: list[dict], *, optimizer: str, lr: float,
              momentum: float, schedule: str, steps: int, warmup_steps: int, seed: int,
              device: torch.device) -> TrainState:
    """A fresh TrainState: the optimizer over `groups`,
    the schedule over `steps`, seeded generators."""
    opt = make_optimizer(groups, optimizer, lr, momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(schedule, steps, warmup_steps))
    return TrainState(model, opt, scheduler, *generators(seed, device))


def make_optimizer(groups: list[dict], optimizer: str, lr: float,
                   momentum: float) -> torch.optim.Optimizer:
    """--optimizer over the parameter groups: SGD with momentum, or AdamW."""
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return torch.optim.AdamW(groups, lr=lr)


def generators(seed: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """A run's own seeded generators: the image order (CPU), and crops and flips (on `device`)."""
    return torch.Generator().manual_seed(seed), torch.Generator(device=device).manual_seed(seed + 1)


def lr_factor(schedule: str, total: int, warmup: int):
    """The learning rate at a step, as a fraction of its peak:
    linear warmup, then cosine (or constant)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
