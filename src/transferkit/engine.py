"""One training epoch and one evaluation pass: plain functions, explicit arguments."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data.transforms import BatchTransform
from .errors import TransferkitError
from .models import train_mode
from .runtime import autocast

log = logging.getLogger(__name__)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def train_one_epoch(
    model: nn.Module, batches: Batches, transform: BatchTransform, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, *, device: torch.device, precision: str,
    label_smoothing: float = 0.0, generator: torch.Generator | None = None, total: int | None = None,
    log_every: int = 0, desc: str = "train", on_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Train over `batches` once; returns mean loss, accuracy, images and seconds."""
    train_mode(model)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, start = 0, time.perf_counter()
    bar = tqdm(batches, total=total, desc=desc, unit="batch", leave=False, disable=None)
    for step, (images, labels) in enumerate(bar, 1):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        x = transform(images, generator)
        with autocast(device, precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        n = labels.shape[0]
        seen += n
        loss_sum += loss.detach() * n
        correct += (logits.argmax(1) == labels).sum()
        if on_step is not None:
            on_step()
        if step % 20 == 0 or (log_every and step % log_every == 0):
            value = loss.item()
            if not math.isfinite(value):
                raise TransferkitError(
                    f"loss became {value} at step {step} (lr {optimizer.param_groups[0]['lr']:.2e}); "
                    "lower --lr or use --precision fp32"
                )
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{value:.3f}", img_s=f"{rate:.0f}")
            if log_every and step % log_every == 0:
                log.info("[%s, batch %5d] loss: %.3f", desc, step, loss_sum.item() / seen)
    seconds = time.perf_counter() - start
    if seen == 0:
        raise TransferkitError("no training batches: the training split is empty")
    loss_mean = loss_sum.item() / seen
    if not math.isfinite(loss_mean):
        raise TransferkitError(f"training loss is {loss_mean}; lower --lr or use --precision fp32")
    return {"loss": loss_mean, "acc": correct.item() / seen, "images": seen, "seconds": seconds}


@torch.no_grad()
def predict_logits(
    model: nn.Module, batches: Batches, transform: BatchTransform, *, device: torch.device,
    precision: str, total: int | None = None, desc: str = "eval",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model in eval mode; returns (fp32 logits on cpu, labels on cpu)."""
    model.eval()
    out, ys = [], []
    for images, labels in tqdm(batches, total=total, desc=desc, unit="batch", leave=False, disable=None):
        x = transform(images.to(device, non_blocking=True))
        with autocast(device, precision):
            out.append(model(x).float().cpu())
        ys.append(labels)
    return torch.cat(out), torch.cat(ys)
