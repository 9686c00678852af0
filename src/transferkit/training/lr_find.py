"""LR range test (Smith 2015, fastai's lr_find): train a few steps at exponentially
growing learning rates, smooth the loss, stop when it diverges, and suggest the lr
where the smoothed loss falls fastest, as the peak of the run's schedule (a cosine
schedule averages half its peak: the suggestion is then twice that lr).

The model, its BatchNorm statistics, the optimizer and torch's global generator are
as they were afterwards: nothing of the test leaks into the training that follows.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import runfiles
from ..config import TrainConfig
from ..data.splits import Split
from ..data.transforms import batches
from ..errors import TransferkitError
from ..files import atomic_write
from ..models import set_trainable, train_mode
from ..report.plots import drawing, pyplot, save_png, wrap
from ..runtime import SINGLE
from . import engine
from .loop import Job, step_setup
from .plan import param_groups
from .state import generators, lr_factor, make_optimizer

log = logging.getLogger(__name__)

STEPS = 100  # steps of the ramp: about 14 per decade from 1e-7 to 1
START_LR = 1e-7
# or 10x the lr asked for where that is larger; the test stops at divergence long before, mostly
END_LR = 1.0
# EMA of the loss: weight of the past (a window of ~10 steps, under one decade of the ramp)
BETA = 0.9
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its minimum
# the first 10% of the steps: the EMA's start-up and the flat part where nothing learns yet
SKIP = 0.1
# below these the suggestion gets a caution: a curve of fewer points is mostly noise, and a ramp
# that went over the same images more often measures memorising them as much as the lr
CAUTION_STEPS = 30
CAUTION_PASSES = 10
JSON_FILE, PNG_FILE = runfiles.LR_FIND_JSON, runfiles.LR_FIND_PNG


@dataclass
class RangeTest:
    """What an LR range test measured: the lr and mean loss of each step,
    the smoothed curve, the suggestion."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float  # the peak lr to train with: `steepest` / `schedule_mean`
    steepest: float  # where the smoothed loss falls fastest
    schedule_mean: float  # the run's mean lr as a fraction of its peak (cosine 0.5, constant 1)
    stopped: str  # why the ramp ended: "diverged", "non-finite loss" or "end of the ramp"
    start_lr: float
    end_lr: float
    steps: int  # asked for; len(lrs) were taken
    batch_size: int
    seconds: float = 0.0
    images: int = 0  # of the split the ramp drew its batches from
    caution: str = ""  # why the suggestion is rough (too few steps or images); empty when it is not
    rule: str = ("steepest descent of the zero-phase smoothed loss (first 10% of the steps "
                 "skipped), divided by the schedule's mean lr factor")
    notes: dict[str, Any] = field(default_factory=dict)  # what it ran on (strategy, model, data)
    out: str = ""  # the folder of lr_find.json and lr_find.png


def check_ramp(steps: int, start_lr: float, end_lr: float) -> None:
    """Refuse a ramp the test cannot read a suggestion from."""
    if steps < 10:
        raise TransferkitError(f"--steps {steps}: the range test needs at least 10 steps "
                               "(about 100 is usual)")
    if not 0 < start_lr < end_lr or not math.isfinite(end_lr):
        raise TransferkitError(f"the lr ramp must rise from a positive --start-lr to a larger "
                               f"--end-lr, not {start_lr:g} -> {end_lr:g}")


def ramp(start_lr: float, end_lr: float, steps: int):
    """The factor of step i (0-based) on a base lr of 1:
    exponential from start_lr to end_lr over `steps`."""
    ratio = end_lr / start_lr
    return lambda i: start_lr * ratio ** (min(i, steps - 1) / max(1, steps - 1))


def ema(values: np.ndarray, beta: float = BETA) -> np.ndarray:
    """Bias-corrected exponential moving average
    (what the divergence test watches, step by step)."""
    out, avg = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def zero_phase(values: np.ndarray, beta: float = BETA) -> np.ndarray:
    """The EMA run forward then backward: as smooth, but centred, so the curve
    does not lag behind the ramp (a forward EMA alone lags ~beta/(1-beta) steps,
    most of a decade of lr here, and would suggest too high)."""
    return ema(ema(values, beta)[::-1], beta)[::-1]


class NoDescent(TransferkitError):
    """The range test's loss never fell: no lr can be read off the curve."""


def suggest(lrs: list[float], losses: list[float]) -> float:
    """The lr where the smoothed loss falls fastest per decade,
    between the first 10% of the steps and the smoothed minimum.

    Why this rule: the steepest descent is where a step gains most from a larger lr while still
    gaining at all; on the zero-phase smoothed curve one noisy batch moves it little, and skipping
    the start keeps the EMA's start-up out. Without a clear descent (the loss never fell), a tenth
    of the lr at the lowest loss.
    """
    x = np.log10(np.asarray(lrs, dtype=np.float64))
    y = np.asarray(losses, dtype=np.float64)
    if len(y) < 5:
        raise TransferkitError("the range test ended after fewer than 5 finite losses; "
                               "lower --start-lr")
    s = zero_phase(y)
    lo, hi = max(1, int(SKIP * len(s))), int(np.argmin(s))
    if hi - lo < 3 and (hi == 0 or s[hi] > 0.99 * s[0]):
        raise NoDescent(f"the loss did not fall over the LR range test ({len(s)} steps, "
                        f"lr {lrs[0]:.1e} to {lrs[-1]:.1e}), so there is no lr to suggest; "
                        "run more --steps or pass --lr")
    if hi - lo < 3:
        log.warning("lr-find: the smoothed loss has no clear descent before its minimum; "
                    "suggesting a tenth of the lr at the lowest loss")
        return float(10 ** x[int(np.argmin(s))] / 10)
    slope = np.gradient(s, x)
    return float(10 ** x[lo + int(np.argmin(slope[lo:hi + 1]))])


def range_test(model: nn.Module, runner: nn.Module, groups: list[dict], train: Split,
               setup: engine.StepSetup, *, optimizer: str, momentum: float, batch_size: int,
               seed: int, steps: int = STEPS, start_lr: float = START_LR, end_lr: float = END_LR,
               schedule_mean: float = 1.0) -> RangeTest:
    """Train `runner` (the model, or its head on cached features) from `train`'s
    batches at an exponentially growing lr; `groups`: the run's parameter groups built
    at lr 1 (their lr is the multiplier of the ramp). `model` (the whole network) is
    restored afterwards, its trainable flags and torch's generator too.
    `schedule_mean`: the run's mean lr over its peak (schedule_mean()): the suggestion
    is the peak whose schedule spends on average the lr where the loss fell fastest."""
    check_ramp(steps, start_lr, end_lr)
    kept = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    cuda_rng = (torch.cuda.get_rng_state(setup.device)  # dropout there
                if setup.device.type == "cuda" else None)
    opt = make_optimizer(groups, optimizer, 1.0, momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ramp(start_lr, end_lr, steps))
    # Generators of its own, seeded as the run's:
    # the run's order and crops stay what they would have been.
    shuffle, augment = generators(seed, setup.device)
    drop_last = engine.steps_per_epoch(len(train), batch_size, SINGLE)[1]
    started = time.perf_counter()
    train_mode(runner, setup.batchnorm)
    try:
        lrs, losses, stopped = _ramp(runner, opt, sched, train, setup, shuffle, augment,
                                     batch_size, drop_last, steps)
    finally:
        model.load_state_dict(kept)
        for p, flag in zip(model.parameters(), trainable):
            p.requires_grad_(flag)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, setup.device)
        opt.zero_grad(set_to_none=True)
    curve = [float(v) for v in ema(np.asarray(losses))]
    steepest = suggest(lrs, losses)
    result = RangeTest(lrs, losses, curve, steepest / schedule_mean, steepest, schedule_mean,
                       stopped, start_lr, end_lr, steps, batch_size, time.perf_counter() - started,
                       len(train))
    result.caution = caution(result)
    log.info("lr-find: %s from %.1e to %.1e (%s) in %.0f s; steepest descent at %.2e: "
             "suggested peak lr %.2e", ramp_words(result), lrs[0], lrs[-1], stopped,
             result.seconds, steepest, result.suggestion)
    if result.caution:
        log.warning("lr-find: %s", result.caution)
    return result


def ramp_words(result: RangeTest) -> str:
    """'91 steps, each on all 54 training images (fewer than batch 64)', or '100 steps of batch 64
    from 4,500 training images (1.4 passes over them)': what the ramp trained on."""
    n, batch, images = len(result.lrs), result.batch_size, result.images
    if images and images <= batch:
        return f"{n} steps, each on all {images:,} training images (fewer than batch {batch})"
    if not images:  # a lr_find.json written before it recorded them
        return f"{n} steps of batch {batch}"
    return (f"{n} steps of batch {batch} from {images:,} training images "
            f"({n * batch / images:.1f} passes over them)")


def caution(result: RangeTest) -> str:
    """Why the suggestion is rough, in a sentence, or "": below CAUTION_STEPS points on the curve,
    or more than CAUTION_PASSES passes over the same images."""
    n, images = len(result.lrs), result.images
    passes = n * min(result.batch_size, images) / images if images else 0
    if n < CAUTION_STEPS:
        why = (f"the curve has only {n} points (the ramp: {result.stopped}); more --steps, or a "
               "lower --start-lr, give it more")
    elif passes > CAUTION_PASSES:
        why = (f"the ramp went over the same {images:,} training images {passes:.0f} times, so "
               "its loss fell as much from memorising them as from the lr; more images firm it up")
    else:
        return ""
    return f"treat the suggestion as rough: {why}, or pass an --lr of your own"


def _ramp(runner: nn.Module, opt: torch.optim.Optimizer, sched, train: Split,
          setup: engine.StepSetup, shuffle: torch.Generator, augment: torch.Generator,
          batch_size: int, drop_last: bool, steps: int) -> tuple[list[float], list[float], str]:
    """The ramp's steps: each one's lr and loss, and why it stopped."""
    lrs: list[float] = []
    losses: list[float] = []
    smooth, best, stopped = 0.0, math.inf, "end of the ramp"
    while len(lrs) < steps and stopped == "end of the ramp":
        order = torch.randperm(len(train), generator=shuffle)
        for images, labels in batches(train, batch_size, order=order, drop_last=drop_last):
            lr = opt.param_groups[0]["lr"]  # the head's: what --lr sets
            fig = engine.train_step(runner, opt, sched, images, labels, setup, augment)
            loss = (fig.loss / fig.images).item()
            if not math.isfinite(loss):
                stopped = "non-finite loss"
                break
            lrs.append(lr)
            losses.append(loss)
            smooth = BETA * smooth + (1 - BETA) * loss
            smoothed = smooth / (1 - BETA ** len(lrs))
            best = min(best, smoothed)
            if len(lrs) > SKIP * steps and smoothed > DIVERGED * best:
                stopped = "diverged"
                break
            if len(lrs) == steps:
                break
    return lrs, losses, stopped


def schedule_mean(schedule: str, steps: int, warmup_steps: int) -> float:
    """The mean lr of a run's schedule (state.lr_factor)
    as a fraction of its peak: cosine with warmup 0.5."""
    factor = lr_factor(schedule, steps, warmup_steps)
    return sum(factor(i) for i in range(steps)) / max(1, steps)


@drawing
def write(out: Path, result: RangeTest, title: str) -> None:
    """lr_find.json (the curve) and lr_find.png
    (loss against lr, the suggestion marked) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    result.out = str(out)
    atomic_write(out / JSON_FILE, json.dumps(asdict(result), indent=2))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(result.lrs, result.losses, color="0.75", lw=1, label="loss of each step")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label=f"smoothed (EMA {BETA})")
    ax.axvline(result.steepest, color="C1", ls=":", label=f"steepest descent {result.steepest:.2e}")
    ax.axvline(result.suggestion, color="C3", ls="--",
               label=f"suggested peak lr {result.suggestion:.2e}"
               + ("" if result.schedule_mean == 1
                  else f" (/ schedule mean {result.schedule_mean:.2f})"))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (head; backbone at --backbone-lr-mult times it)")
    ax.set_ylabel("training loss")
    finite = [v for v in result.smoothed if math.isfinite(v)]
    # a diverged tail would squash the useful part of the curve: show up to a bit above the start
    if finite:
        start = max(finite[:max(1, int(SKIP * len(finite)))])
        ax.set_ylim(min(finite) * 0.95,
                    min(max(finite), 1.25 * start, DIVERGED * min(finite)) * 1.05)
    lines = [title, f"{ramp_words(result)}, {result.stopped}"]
    lines += [f"Caution: {result.caution}."] if result.caution else []
    shown = "\n".join(wrap(line, 6.0, 9) for line in lines)
    ax.set_title(shown, fontsize=9)
    fig.set_figheight(4.2 + 1.3 * 9 / 72 * (shown.count("\n") - 1))  # the axes keep their height
    ax.legend(fontsize=8)
    save_png(fig, out / PNG_FILE)


def run_test(job: Job, **ramp: Any) -> RangeTest:
    """The LR range test on what the run trains: its stage, transforms, passes, loss and parameter
    groups ('gradual': the whole network, which its lr drives after --head-epochs)."""
    cfg, stage, model, head = job.cfg, job.stage, job.bb.model, job.card.head
    trainable = [p.requires_grad for p in model.parameters()]
    set_trainable(model, head, cfg.strategy != "linear", list(job.plan.frozen_blocks))
    setup = step_setup(job)  # one process, no mixing: the ramp's steps are the run's plain steps
    # the ramp scales them (--layer-decay too)
    groups = param_groups(cfg.replace(lr=1.0), model, head)
    end = ramp.pop("end_lr", None) or max(END_LR, 10 * cfg.lr if cfg.lr != "auto" else 0)
    steps, _ = engine.steps_per_epoch(len(stage.train), cfg.batch_size, SINGLE)
    mean = schedule_mean(cfg.schedule, steps * cfg.epochs, round(cfg.warmup_epochs * steps))
    try:
        return range_test(model, stage.runner, groups, stage.train, setup, optimizer=cfg.optimizer,
                          momentum=cfg.momentum, batch_size=cfg.batch_size, seed=cfg.seed,
                          end_lr=end, schedule_mean=mean, **ramp)
    finally:
        for p, flag in zip(model.parameters(), trainable):
            p.requires_grad_(flag)


def auto_lr(job: Job, out: Path) -> TrainConfig:
    """--lr auto: the range test's suggestion (rank 0 runs it, every process trains at it), in
    config.yaml (what was asked for, 'auto', under requested:)."""
    cfg, dist = job.cfg, job.hw.dist
    # SyncBatchNorm in rank 0's test would wait for the others
    if dist.on and cfg.batchnorm == "sync":
        raise TransferkitError("--lr auto with --batchnorm sync under torchrun: "
                               "run 'transferkit lr-find' with the same settings in one process "
                               "first, then pass its suggestion as --lr")
    found, lr = None, None
    if dist.main:
        try:
            found = run_test(job)
            lr = found.suggestion
        except NoDescent as e:  # an lr to train at still beats no run: the default, said so
            lr = TrainConfig.__dataclass_fields__["lr"].default
            log.warning("--lr auto: %s; training at the default lr %g instead", e, lr)
    cfg = cfg.replace(lr=dist.share(lr))
    if found is not None:
        log.info("--lr auto: lr %.3g, the LR range test's suggestion (curve: %s)", cfg.lr,
                 out / PNG_FILE)
    job.requested["lr"] = "auto"
    if dist.main:
        if found is not None:
            write(out, found, f"{cfg.model} on {cfg.data}, {cfg.strategy}")
        atomic_write(out / runfiles.CONFIG, cfg.to_yaml(job.requested))
    return cfg
