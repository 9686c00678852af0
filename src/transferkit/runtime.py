"""Device, precision, seeding: the few facts about the hardware a run depends on."""

from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path

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
        raise TransferkitError("device 'cuda' asked for, but no CUDA GPU is visible; use --device cpu")
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
        log.warning("bf16 asked for, but this %s has no native bf16: expect it to be slower than fp32",
                    device.type)
    return requested


def autocast(device: torch.device, precision: str):
    """The autocast context for this precision (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
