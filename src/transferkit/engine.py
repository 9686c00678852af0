"""One training epoch and one evaluation pass: plain functions, explicit arguments."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data.transforms import BatchTransform
from .errors import TransferkitError
from .models import train_mode
from .runtime import SINGLE, Dist, autocast, is_quiet_rank

log = logging.getLogger(__name__)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def train_one_epoch(
    model: nn.Module, batches: Batches, transform: BatchTransform, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, *, device: torch.device, precision: str,
    label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None, total: int | None = None, start_step: int = 0,
    running: dict[str, Any] | None = None, log_every: int = 0, desc: str = "train",
    after_step: Callable[[int, Callable[[], dict[str, Any]]], bool] | None = None,
    dist: Dist = SINGLE, batchnorm: str = "train", micro_batch: int | None = None,
) -> dict[str, Any]:
    """Train over `batches` once, from `start_step` with the `running` sums of a resumed epoch.

    `batches` yields whole (global) batches; under torchrun each rank trains on its share of
    every batch and the loss is scaled so that DistributedDataParallel's gradient average equals
    the gradient of the whole batch's loss: the result does not depend on the number of processes
    (except through BatchNorm's batch statistics, which each process takes over its share).
    `micro_batch` caps the images per forward/backward pass (gradients accumulate to one step),
    which bounds activation memory; only BatchNorm's batch statistics see the smaller parts.
    `after_step(step, snapshot)` runs after every step (on every rank); `snapshot()` gives the
    running sums (over all ranks) to checkpoint, and returning True stops the epoch there.
    Returns mean loss, accuracy, images, seconds, the last step and whether it stopped early.
    """
    train_mode(model, batchnorm)
    running = running or {}
    loss_sum = running.get("loss_sum", torch.zeros((), dtype=torch.float64)).to(device)
    correct = running.get("correct", torch.zeros((), dtype=torch.long)).to(device)
    seen, before = int(running.get("seen", 0)), float(running.get("seconds", 0.0))
    start = time.perf_counter()
    cpu_weights = None if class_weights is None else class_weights.cpu()

    def totals() -> tuple[float, int, int]:
        s, c, n = dist.sum(loss_sum, correct, seen)
        return s.item(), int(c), int(n)

    def snapshot() -> dict[str, Any]:
        check_finite(loss_sum, step)
        s, c, n = totals()
        return {"loss_sum": torch.tensor(s, dtype=torch.float64), "correct": torch.tensor(c), "seen": n,
                "seconds": before + time.perf_counter() - start}

    def check_finite(value: torch.Tensor, at: int) -> None:
        mine = not torch.isfinite(value).all()
        if (dist.sum(float(mine))[0] > 0) if dist.on else mine:  # all processes stop together
            shown = value.item() if mine else "non-finite in another process"
            raise NonFiniteLoss(
                f"loss became {shown} by step {at} (lr {optimizer.param_groups[0]['lr']:.2e}); the last "
                "good checkpoint is kept. Lower --lr, or use --precision fp32"
            )

    step, stopped = start_step, False
    bar = tqdm(batches, total=total, initial=start_step, desc=desc, unit="batch", leave=False,
               disable=True if is_quiet_rank() else None)
    for images, labels in bar:
        step += 1
        n = labels.shape[0]
        # The loss of the whole batch is the (weighted) mean over all its images.
        norm = float(n) if cpu_weights is None else cpu_weights[labels].sum().item()
        rows = dist.shard(n)
        parts = micro_batches(rows, micro_batch, -(-n // dist.world))
        # Every part redraws the whole batch's random crops from the same generator state and
        # keeps its own rows: the crops do not depend on how the batch is split.
        fork = generator.get_state() if generator is not None and len(parts) > 1 else None
        optimizer.zero_grad(set_to_none=True)
        batch_loss = torch.zeros((), dtype=torch.float64, device=device)
        for i, part in enumerate(parts):
            if fork is not None:
                generator.set_state(fork)
            x = transform(images[part].to(device, non_blocking=True), generator, part=(part, n))
            mine = labels[part].to(device, non_blocking=True)
            # DistributedDataParallel averages gradients once per step, after the last part.
            last = i == len(parts) - 1
            with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
                with autocast(device, precision):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), mine, weight=class_weights,
                                       label_smoothing=label_smoothing, reduction="sum") * (dist.world / norm)
                loss.backward()
            batch_loss += loss.detach().double()
            seen += mine.shape[0]
            correct += (logits.argmax(1) == mine).sum()
        optimizer.step()
        scheduler.step()
        loss_sum += batch_loss * (n / dist.world)  # summed over ranks: the batch's loss x n
        if step % 20 == 0 or (log_every and step % log_every == 0):
            check_finite(loss_sum, step)
            rate = dist.world * (seen - running.get("seen", 0)) / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{batch_loss.item():.3f}", img_s=f"{rate:.0f}")
            if log_every and step % log_every == 0:
                log.info("[%s, batch %5d] loss: %.3f", desc, step, loss_sum.item() / max(seen, 1))
        if after_step is not None and after_step(step, snapshot):
            stopped = True
            break
    check_finite(loss_sum, step)
    total_loss, total_correct, total_seen = totals()
    if total_seen == 0:
        raise TransferkitError("no training batches: the training split is empty")
    return {"loss": total_loss / total_seen, "acc": total_correct / total_seen, "images": total_seen,
            "seconds": before + time.perf_counter() - start, "step": step, "stopped": stopped}


def micro_batches(rows: slice, size: int | None, largest: int | None = None) -> list[slice]:
    """`rows` cut into near-equal parts: as many as the largest share (`largest` rows, on any
    process) needs for parts of at most `size`, so every process makes the same number of passes
    (SyncBatchNorm runs a collective in each)."""
    n = rows.stop - rows.start
    most = max(n, largest or 0)
    k = 1 if not size or most <= size else -(-most // size)
    bounds = [rows.start + (n * i) // k for i in range(k + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


class NonFiniteLoss(TransferkitError):
    """The loss became NaN or infinite."""


@torch.no_grad()
def predict_logits(
    model: nn.Module, batches: Batches, transform: BatchTransform, *, device: torch.device,
    precision: str, total: int | None = None, desc: str = "eval", flip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model in eval mode; returns (fp32 logits on cpu, labels on cpu). `flip`: test-time
    augmentation, the mean of the probabilities of each image and its mirror image (as log-probabilities)."""
    model.eval()
    out, ys = [], []
    for images, labels in tqdm(batches, total=total, desc=desc, unit="batch", leave=False,
                               disable=True if is_quiet_rank() else None):
        x = transform(images.to(device, non_blocking=True))
        out.append(infer(model, x, device=device, precision=precision, flip=flip).cpu())
        ys.append(labels)
    return torch.cat(out), torch.cat(ys)


def infer(model: nn.Module, x: torch.Tensor, *, device: torch.device, precision: str,
          flip: bool = False) -> torch.Tensor:
    """fp32 logits of a prepared batch; with `flip`, log of the mean probability over x and its mirror."""
    with autocast(device, precision):
        logits = model(x).float()
        if not flip:
            return logits
        mirrored = model(x.flip(-1)).float()
    return ((logits.softmax(1) + mirrored.softmax(1)) / 2).log()
