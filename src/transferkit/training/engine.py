"""The training step, one epoch of them, and evaluation: plain functions, explicit arguments."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ..data.mixing import Mix, Mixing
from ..data.splits import Split
from ..data.transforms import batches as split_batches
from ..data.transforms import num_batches
from ..errors import TransferkitError
from ..models import train_mode
from ..runtime import SINGLE, Dist, autocast
from ..task import ONE_CLASS, Task

log = logging.getLogger(__name__)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
Transform = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class StepSetup:
    """How a training step runs: the transform,
    where and in what precision, the loss, the passes."""

    transform: Transform
    device: torch.device
    precision: str = "fp32"
    # images per forward/backward pass (None: the whole share at once)
    micro_batch: int | None = None
    label_smoothing: float = 0.0
    class_weights: torch.Tensor | None = None  # on the device
    batchnorm: str = "train"
    dist: Dist = SINGLE
    mixing: Mixing | None = None  # --mixup / --cutmix
    task: Task = ONE_CLASS  # its loss (class_weights: multi-label, each label's positive weight)

    def __post_init__(self) -> None:
        # the weights once on the cpu too, to weigh each batch's labels there
        object.__setattr__(self, "_cpu_weights",
                           None if self.class_weights is None else self.class_weights.cpu())


@dataclass
class StepFigures:
    """What one step measured on this process:
    the summed loss (x images), correct answers, images."""

    step: int
    loss: torch.Tensor
    correct: torch.Tensor
    images: int


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, images: torch.Tensor,
               labels: torch.Tensor, s: StepSetup,
               generator: torch.Generator | None) -> StepFigures:
    """One optimizer step on a whole (global) batch, in passes of at most `s.micro_batch` images.

    Under torchrun each process takes its share of the batch; the loss is scaled so that the
    gradients DDP averages, summed over the passes, are the gradient of the whole batch's mean loss.
    Every pass redraws the whole batch's random crops from the same generator state and keeps its
    own rows, so neither the crops nor the step depend on how the batch is split.
    """
    n, d = labels.shape[0], s.dist
    norm = s.task.norm(labels, s._cpu_weights)
    passes = micro_batches(d.shard(n), s.micro_batch, -(-n // d.world))
    mix = s.mixing.draw(n, generator) if s.mixing is not None else None
    fork = (generator.get_state()
            if generator is not None and (len(passes) > 1 or mix is not None) else None)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), dtype=torch.float64, device=s.device)
    correct = torch.zeros((), dtype=torch.long, device=s.device)
    for i, rows in enumerate(passes):
        x, y, y2, lam = _pass_inputs(images, labels, rows, n, s, generator, fork, mix)
        last = i == len(passes) - 1  # DDP averages the gradients once, after the last pass
        loss, logits = _pass_backward(model, x, y, y2, lam, s, d.world / norm, last)
        loss_sum += loss.detach().double()
        # with mixed targets, a right answer is the label with the larger share
        # (mixup's usual train accuracy)
        correct += s.task.correct(logits, y if lam >= 0.5 else y2)
    optimizer.step()
    scheduler.step()
    return StepFigures(0, loss_sum * (n / d.world), correct, passes[-1].stop - passes[0].start)


def _pass_inputs(images: torch.Tensor, labels: torch.Tensor, rows: slice, n: int, s: StepSetup,
                 generator: torch.Generator | None, fork: torch.Tensor | None,
                 mix: Mix | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """A pass's transformed images and labels: (x, y, the partners' labels, y's share)."""
    if fork is not None:
        generator.set_state(fork)
    x = s.transform(images[rows].to(s.device, non_blocking=True), generator, part=(rows, n))
    y = labels[rows].to(s.device, non_blocking=True)
    lam, y2 = 1.0, None
    if mix is not None:  # the partners as their own rows are transformed: the same draws again
        partner = mix.partner[rows]
        if fork is not None:
            generator.set_state(fork)
        other = s.transform(images[partner].to(s.device, non_blocking=True), generator,
                            part=(partner, n))
        x, lam = mix.apply(x, other)
        y2 = labels[partner].to(s.device, non_blocking=True)
    return x, y, y2, lam


def _pass_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, y2: torch.Tensor | None,
                   lam: float, s: StepSetup, scale: float,
                   last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A pass's forward and backward, its loss scaled by `scale`: (that loss, the logits)."""
    with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
        with autocast(s.device, s.precision):
            logits = model(x)
        loss = _loss(logits.float(), y, s) * lam
        # cross-entropy is linear in the target: the mixed target's loss is the mix of the two
        if lam < 1:
            loss = loss + _loss(logits.float(), y2, s) * (1 - lam)
        # the partners' weights sum to the batch's: the same norm
        loss = loss * scale
        loss.backward()
    return loss, logits


def _loss(logits: torch.Tensor, y: torch.Tensor, s: StepSetup) -> torch.Tensor:
    """The summed loss of a pass (weighted, smoothed as set up)."""
    return s.task.loss(logits, y, weights=s.class_weights, smoothing=s.label_smoothing)


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, batches: Batches,
                    setup: StepSetup, generator: torch.Generator | None,
                    start_step: int = 0) -> Iterator[StepFigures]:
    """Train over `batches`, yielding each step's figures (numbered from `start_step` + 1)."""
    train_mode(model, setup.batchnorm)
    for step, (images, labels) in enumerate(batches, start_step + 1):
        figures = train_step(model, optimizer, scheduler, images, labels, setup, generator)
        figures.step = step
        yield figures


def micro_batches(rows: slice, size: int | None, largest: int | None = None) -> list[slice]:
    """`rows` cut into near-equal parts: as many as the largest share (`largest` rows, on any
    process) needs for parts of at most `size`, so every process makes the same number of passes
    (SyncBatchNorm runs a collective in each)."""
    n = rows.stop - rows.start
    most = max(n, largest or 0)
    k = 1 if not size or most <= size else -(-most // size)
    bounds = [rows.start + (n * i) // k for i in range(k + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, transform: Transform, *, batch_size: int,
             device: torch.device, precision: str, tta: bool = False, dist: Dist = SINGLE,
             workers: int = 0, desc: str | None = None, show: bool | None = None,
             unread: list[tuple[str, str]] | None = None,
             task: Task = ONE_CLASS) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits (on the cpu) and labels of a whole split, in eval mode; `tta`: mirror test-time
    augmentation (as `task` combines the two). Under torchrun each process runs a share and every
    process gets all rows; rank 0 alone shows a progress bar (`show` overrides). A file of a
    streamed split that can no longer be read is never scored: its row is left out and the file
    added to `unread` (path, why), on every process (a warning when `unread` is None)."""
    show = dist.main if show is None else show
    lost: list[tuple[str, str]] = []

    def run(part: Split) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model.eval()
        out, ys = [], []
        for images, labels in tqdm(split_batches(part, batch_size, workers=workers, unread=lost),
                                   desc=desc or split.name, unit="batch", leave=False,
                                   disable=True if not show else None):
            if len(labels):
                x = transform(images.to(device, non_blocking=True))
                out.append(infer(model, x, device=device, precision=precision, tta=tta,
                                 task=task).cpu())
                ys.append(labels)
        if not out:  # none of this share read: no rows, as wide as the model's answers
            blank = transform(torch.zeros((1, *part.images.shape[1:]), dtype=torch.uint8,
                                          device=device))
            out = [infer(model, blank, device=device, precision=precision)[:0].cpu()]
            ys = [part.labels[:0]]
        return torch.cat(out), torch.cat(ys), _read_rows(part, lost)

    logits, labels, read = sharded(run, split, dist)
    if not read.all():
        why = dict(lost)
        gone = [(f, why.get(f, "could no longer be read")) for f, ok in
                zip(split.files or [], read.tolist()) if not ok]
        if unread is not None:
            unread += gone
        else:
            log.warning("left out %d of %d %s images that could no longer be read, e.g. %s (%s)",
                        len(gone), len(split), split.name, *gone[0])
    return logits, labels


def _read_rows(part: Split, unread: list[tuple[str, str]]) -> torch.Tensor:
    """Which rows of `part` were read (uint8: gathered from every process)."""
    gone = {f for f, _ in unread}
    return torch.tensor([f not in gone for f in part.files or ["" for _ in range(len(part))]],
                        dtype=torch.uint8)


def sharded(fn: Callable[[Split], tuple[torch.Tensor, ...]], split: Split,
            dist: Dist) -> tuple[torch.Tensor, ...]:
    """fn over this process's share of `split`, its rows gathered from all processes in order."""
    if not dist.on or len(split) < dist.world:
        return fn(split)
    mine = split.subset(torch.arange(len(split))[dist.shard(len(split))])
    return tuple(dist.gather_rows(t) for t in fn(mine))


def infer(model: nn.Module, x: torch.Tensor, *, device: torch.device, precision: str,
          tta: bool = False, task: Task = ONE_CLASS) -> torch.Tensor:
    """fp32 logits of a prepared batch; with `tta`, logits whose probabilities are the mean of
    x's and its mirror image's."""
    with autocast(device, precision):
        logits = model(x).float()
        if not tta:
            return logits
        mirrored = model(x.flip(-1)).float()
    return task.tta(logits, mirrored)


# a pass of 16 images at 224 px keeps a CPU fine-tune under 3 GB
CPU_PIXELS_PER_PASS = 16 * 224 * 224


def micro_batch_for(micro_batch: int, device: torch.device, size: int) -> int | None:
    """Images per forward/backward pass: --micro-batch, or on a CPU (0: auto) as many as keep the
    activations of 16 images at 224 px; on a GPU the whole batch."""
    if micro_batch:
        return micro_batch
    return max(1, int(CPU_PIXELS_PER_PASS / size**2)) if device.type == "cpu" else None


def eval_batch_for(batch_size: int, dist: Dist, micro: int | None) -> int:
    """Evaluation keeps no activations for a backward pass: twice the training pass."""
    per_process = max(1, 2 * batch_size // dist.world)
    return per_process if micro is None else min(per_process, 2 * micro)


def steps_per_epoch(images: int, batch_size: int, dist: Dist) -> tuple[int, bool]:
    """Steps per epoch, and whether the last batch is dropped
    (a share of one image breaks BatchNorm)."""
    drop_last = 0 < images % batch_size < 2 * dist.world
    steps = num_batches(images, batch_size, drop_last)
    if steps == 0:
        raise TransferkitError(
            f"the training split has {images} images: too few for one batch shared by "
            f"{dist.world} processes (two images each); add images or use fewer processes"
        )
    return steps, drop_last


def check_passes(model: nn.Module, frozen: Sequence[str], batch_size: int, last_batch: int,
                 micro: int | None, dist: Dist, after_oom: bool = False) -> None:
    """Refuse passes of one image where BatchNorm normalizes with batch statistics (it cannot: the
    run would stop with a traceback at that pass).
    `frozen`: module names whose BatchNorm stays frozen."""
    try:
        _check_passes(model, frozen, batch_size, last_batch, micro, dist)
    except TransferkitError as e:
        if after_oom:  # the passes were made smaller because memory ran out
            raise TransferkitError("out of memory, and smaller passes would break BatchNorm: "
                                   f"{e}") from None
        raise


def _check_passes(model: nn.Module, frozen: Sequence[str], batch_size: int, last_batch: int,
                  micro: int | None, dist: Dist) -> None:
    prefixes = tuple(f"{f}." for f in frozen)
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
               and not (name + ".").startswith(prefixes)
               for name, m in model.named_modules()):
        return
    for n in {batch_size, last_batch} - {0}:
        for rank in range(dist.world):
            rows = Dist(rank=rank, world=dist.world).shard(n)
            if min(p.stop - p.start for p in micro_batches(rows, micro, -(-n // dist.world))) < 2:
                # a larger pass is the batch
                passes = f" in passes of {micro}" if micro and micro < n else ""
                raise TransferkitError(
                    f"a batch of {n} image(s){passes} on {dist.world} process(es) leaves passes "
                    "of one image, which BatchNorm cannot normalize; use a larger --batch-size, "
                    "--micro-batch 3 or more, or --batchnorm frozen")


def smaller_passes(micro: int | None, batch_size: int, image_size: int, no_retry: str | None,
                   device: torch.device) -> int:
    """After running out of memory: half the images per pass (the batch, and so
    the step, stay the same), or a clear error when the run may not start again
    (`no_retry` says why) or one image did not fit."""
    now = min(micro or batch_size, batch_size)
    if no_retry or now < 2:
        raise TransferkitError(
            f"out of memory in passes of {now} image(s) at {image_size} px"
            + (f" (not retried: {no_retry})" if no_retry and now >= 2 else "")
            + "; lower --micro-batch or --image-size, or use --strategy linear or "
              "--trainable-blocks K")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return now // 2
