"""--ema: an exponential moving average of the weights,
which validates, is selected and is saved."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


class WeightAverage:
    """An averaged copy of `model`: its trainable parameters and its
    floating-point buffers (BatchNorm's running statistics, as AveragedModel's
    use_buffers=True) move towards the model's after every step.

    The decay is warmed up as min(decay, (1 + t) / (10 + t)) after t updates (timm's ModelEmaV3
    warmup), so a short run's average is not dominated by the weights it started from. Parameters
    that do not train (a frozen backbone) are left alone: they equal the model's already.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step's move towards `model`'s weights (the same architecture as the copy)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        mine, theirs, copied = [], [], []
        for a, p in zip(self.module.parameters(), model.parameters()):
            if p.requires_grad:
                mine.append(a)
                theirs.append(p.detach())
        for a, b in zip(self.module.buffers(), model.buffers()):
            if a.is_floating_point():
                mine.append(a)
                theirs.append(b)
            else:
                copied.append((a, b))  # BatchNorm's num_batches_tracked
        if mine:
            get_ema_multi_avg_fn(decay)(mine, theirs, None)
        for a, b in copied:
            a.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.module.load_state_dict(d["model"])
        self.updates = int(d["updates"])
