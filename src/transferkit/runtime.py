"""Device, precision, seeding, torchrun ranks: the few facts about the hardware a run depends on."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import TransferkitError

log = logging.getLogger(__name__)


def pick_device(spec: str = "auto") -> torch.device:
    """'auto' -> cuda when present, else cpu; anything else is checked, not trusted."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise TransferkitError(f"unknown device '{spec}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TransferkitError("device 'cuda' asked for, but no CUDA GPU is visible; "
                               "use --device cpu")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bf16 math (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and runs several times slower than fp32 (measured 10x slower on an AVX2-only EPYC)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where the device computes it natively, else 'fp32' with a notice."""
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        fast = device.type == "cpu" and cpu_has_fast_bf16()
    if requested == "auto":
        if not fast:
            log.info("precision: fp32 (this %s has no native bf16 support)", device.type)
        return "bf16" if fast else "fp32"
    if requested == "bf16" and not fast:
        log.warning("bf16 asked for, but this %s has no native bf16: expect it to be slower "
                    "than fp32", device.type)
    return requested


def autocast(device: torch.device, precision: str):
    """The autocast context for this precision (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Fp32DepthwiseConv2d(torch.nn.Conv2d):
    """A depthwise convolution that, when a backward pass follows, computes in fp32 under bf16
    autocast and hands on its input's dtype; the same parameters and state_dict. On a CPU, oneDNN's
    bf16 backward pass of a depthwise convolution is its slowest kernel by far (51 ms of
    MobileNetV2's 770 ms step at 112 px for one strided layer, 95 ms of 407 at 48 px for three at
    2x2); the fp32 kernels take a fraction of that (benchmarks/RESULTS.md, "Performance").
    Forward alone (evaluation) keeps the bf16 kernel, the faster one there."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return super().forward(x)  # no backward pass: the bf16 kernel is the faster one forward
        with torch.autocast(x.device.type, enabled=False):
            y = self._conv_forward(x.float(), self.weight, self.bias)
        return y.to(x.dtype)


def depthwise_in_fp32(model: torch.nn.Module, device: torch.device, precision: str) -> int:
    """For a run on a CPU in bf16: its depthwise convolutions become `Fp32DepthwiseConv2d`
    (in place, same weights); elsewhere (fp32, GPUs) nothing changes. Returns how many."""
    if device.type != "cpu" or precision != "bf16":
        return 0
    swapped = 0
    for m in model.modules():
        if (type(m) is torch.nn.Conv2d and m.groups > 1 and m.groups == m.in_channels
                and m.weight.dtype == torch.float32):
            m.__class__ = Fp32DepthwiseConv2d
            swapped += 1
    return swapped


def seed_everything(seed: int, device: torch.device | None = None) -> None:
    """Seed Python, NumPy and torch: the CPU's generator, and every device's unless `device` says
    the run computes on the CPU (a CPU run leaves the GPUs' generators alone)."""
    random.seed(seed)
    np.random.seed(seed)
    if device is not None and device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


@contextlib.contextmanager
def kept_generators(device: torch.device) -> Iterator[None]:
    """The caller's global generators (Python's, NumPy's, torch's on the CPU and on `device`'s
    kind) as they were before the block: a library call seeds them for its own run
    (seed_everything) and leaves them as it found them, as it does the logger and the signal
    handlers."""
    python, numpy = random.getstate(), np.random.get_state()
    devices = ([] if device.type == "cpu"
               else list(range(torch.get_device_module(device.type).device_count())))
    try:
        with torch.random.fork_rng(devices, device_type=device.type):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


def rank_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """The seed of a torchrun process's own randomness (dropout) from the run's seed: rank 0 keeps
    the run's seed; the others get their own noise, fresh again at each resumed epoch."""
    return seed + 7919 * rank + 104729 * epoch


def memory_bytes() -> int:
    """This process's part of the memory: the machine's (or its container's limit), divided
    among the torchrun processes on it."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        total = min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        pass
    return total // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@dataclass
class StopFlag:
    """Set by the first Ctrl-C or SIGTERM: finish the step, save, stop."""

    requested: bool = False


@contextlib.contextmanager
def stop_on_signals(repeat_window: float = 0.0) -> Iterator[StopFlag]:
    """First Ctrl-C (or SIGTERM, what torchrun and job schedulers send) sets the flag; a second
    one stops at once (KeyboardInterrupt). Under torchrun a terminal's Ctrl-C reaches a worker
    twice (from the terminal and from torchrun), so a repeat within `repeat_window` seconds is
    the same stop. Outside the main thread signals cannot be caught."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    first = 0.0

    def handler(signum, frame):
        nonlocal first
        if flag.requested:
            if time.monotonic() - first < repeat_window:
                return
            raise KeyboardInterrupt
        flag.requested, first = True, time.monotonic()
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        log.warning("%s: finishing this step and saving a checkpoint (again to abort now)", name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    restart: int = 0  # how often torchrun restarted the workers (--max-restarts)
    started_here: bool = False  # this call created the process group (and destroys it)
    run_id: str | None = None  # torchrun's --rdzv-id (None for its default, or outside torchrun)
    max_restarts: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        """This process's place as torchrun's environment
        describes it (the one place that reads it)."""
        env = os.environ
        run_id = env.get("TORCHELASTIC_RUN_ID")
        return cls(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")),
                   int(env.get("LOCAL_RANK", "0")), int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
                   False, None if run_id in (None, "none") else run_id,
                   int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of n items; shares differ in size by at most one."""
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return slice(lo, lo + base + (self.rank < extra))

    def barrier(self) -> None:
        if self.on:
            torch.distributed.all_reduce(torch.zeros(1))

    def sum(self, *values: torch.Tensor | float) -> list[torch.Tensor]:
        """Each value summed over all ranks (float64, on the cpu)."""
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().cpu() for v in values])
        if self.on:
            torch.distributed.all_reduce(t)
        return list(t)

    def all(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on every rank."""
        return bool(self.sum(float(flag))[0] == self.world)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's rows (dim 0) of `t`, concatenated in rank order, on every rank."""
        if not self.on:
            return t
        t = t.detach().cpu().contiguous()
        sizes = torch.zeros(self.world, dtype=torch.long)
        sizes[self.rank] = t.shape[0]
        torch.distributed.all_reduce(sizes)
        padded = torch.zeros((int(sizes.max()), *t.shape[1:]), dtype=t.dtype)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes.tolist())])

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) in every process, as the saved model has them."""
        if self.on:
            for b in module.buffers():
                torch.distributed.broadcast(b, src=0)

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (an in-memory copy between the job's own processes)."""
        if not self.on:
            return obj
        box = [obj if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, module: torch.nn.Module, compiled: torch.nn.Module, compile: bool,
             device: torch.device) -> torch.nn.Module:
        """What runs forward in training: `compiled` alone, or under torchrun
        DistributedDataParallel around `module` (compiled again when asked)."""
        if not self.on:
            return compiled
        ids = [device.index] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
        return torch.compile(ddp) if compile else ddp

    @contextlib.contextmanager
    def local_main_first(self):
        """The first process on each machine runs the body (downloads, caches) before the others."""
        if self.on and self.local_rank != 0:
            self.barrier()
        try:
            yield
        finally:
            if self.on and self.local_rank == 0:
                self.barrier()


SINGLE = Dist()  # a process on its own


def start_distributed(device_spec: str) -> tuple[Dist, torch.device]:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, ...), if any.

    NCCL carries GPU tensors and gloo CPU ones; each process takes the GPU of its LOCAL_RANK.
    Outside torchrun this is just pick_device().
    """
    dist = Dist.from_env()
    if not dist.on:
        return Dist(), pick_device(device_spec)
    device = pick_device(device_spec)
    if device.type == "cuda":
        if device.index is not None and device_spec != "auto" and ":" in device_spec:
            raise TransferkitError(
                f"--device {device_spec} names one GPU, but under torchrun each process takes the "
                "GPU of its LOCAL_RANK; use --device cuda (or auto) and choose GPUs with "
                "CUDA_VISIBLE_DEVICES"
            )
        if dist.local_rank >= torch.cuda.device_count():
            raise TransferkitError(
                f"this machine shows {torch.cuda.device_count()} GPUs but torchrun started local "
                f"rank {dist.local_rank}; set --nproc_per_node to at most the number of GPUs"
            )
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if torch.distributed.is_initialized():
        return dist, device
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    # torchrun's store outlives a restart (--max-restarts); keys of its own per attempt keep the
    # new workers from reading the dead workers' addresses (which fails with "Connection refused").
    store, _, _ = next(torch.distributed.rendezvous("env://", dist.rank, dist.world))
    store = torch.distributed.PrefixStore(f"transferkit/attempt{dist.restart}", store)
    torch.distributed.init_process_group(backend=backend, store=store, rank=dist.rank,
                                         world_size=dist.world)
    return dataclasses.replace(dist, started_here=True), device


def check_world(dist: Dist, device: torch.device, batch_size: int, batchnorm: str) -> None:
    """Refuse a torchrun job whose global batch or BatchNorm mode does not fit its processes."""
    if batch_size < 2 * dist.world:
        raise TransferkitError(
            f"--batch-size {batch_size} is the global batch, shared by {dist.world} processes; "
            f"it must be at least {2 * dist.world} (two images per process)"
        )
    if batchnorm == "sync" and device.type != "cuda":
        raise TransferkitError("--batchnorm sync needs GPUs (NCCL); "
                               "on CPUs use --batchnorm train or frozen")
    per = f"{batch_size // dist.world}" + ("" if batch_size % dist.world == 0
                                               else f"-{batch_size // dist.world + 1}")
    log.info("torchrun: %d processes, global batch %d (%s per process)", dist.world, batch_size,
             per)


def stop_distributed(dist: Dist) -> None:
    if dist.started_here and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def distributed(device_spec: str) -> Iterator[tuple[Dist, torch.device]]:
    """This process's place in the torchrun job (if any)
    and its device, for the time of the block."""
    dist, device = start_distributed(device_spec)
    try:
        yield dist, device
    finally:
        stop_distributed(dist)


@dataclass(frozen=True)
class Compute:
    """Where this process computes and how:
    its place in the torchrun job, its device, its precision."""

    dist: Dist
    device: torch.device
    precision: str  # 'bf16' or 'fp32' (resolve_precision)
