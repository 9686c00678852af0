"""--mixup / --cutmix: each training batch blends pairs
of its images, and their labels by the same share."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Mix:
    """One batch's draw: image i is mixed with image `partner[i]`, keeping share `lam` of its own
    (for cutmix, the part outside `box`: (top, left, height, width) as fractions of the side)."""

    partner: torch.Tensor  # (n,) row numbers of the batch, on the cpu
    lam: float
    box: tuple[float, float, float, float] | None = None

    def apply(self, x: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The mixed inputs of a pass (x: its rows, other: their partners, both
        transformed) and the share of each image's own label in them (cutmix: by
        the area its box leaves, after clipping at the borders)."""
        if self.box is None:
            return x * self.lam + other * (1 - self.lam), self.lam
        side = x.shape[-1]
        top, left, h, w = (round(v * side) for v in self.box)
        h, w = min(h, side - top), min(w, side - left)
        out = x.clone()
        out[..., top:top + h, left:left + w] = other[..., top:top + h, left:left + w]
        return out, 1 - h * w / side**2


@dataclass(frozen=True)
class Mixing:
    """Beta(alpha, alpha) shares; with both alphas set,
    each batch is mixup or cutmix at even odds."""

    mixup: float = 0.0
    cutmix: float = 0.0

    def draw(self, n: int, g: torch.Generator | None) -> Mix:
        """The batch's partners and share, every random
        number from `g` (the run's saved generator)."""
        dev = "cpu" if g is None else g.device
        u = torch.rand(4, generator=g, device=dev).cpu()
        seed = int(torch.randint(0, 2**62, (1,), generator=g, device=dev))
        partner = torch.randperm(n, generator=g, device=dev).cpu()
        cut = self.cutmix > 0 and (self.mixup == 0 or float(u[0]) < 0.5)
        alpha = self.cutmix if cut else self.mixup
        # torch samples Beta from the global generator only:
        # seed it from the run's, and put it back after
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lam = float(torch.distributions.Beta(alpha, alpha).sample())
        if not cut:
            return Mix(partner, lam)
        r = (1 - lam) ** 0.5  # the box's side, as a fraction: its area is 1 - lam before clipping
        cy, cx = float(u[1]), float(u[2])
        top, bottom = max(cy - r / 2, 0.0), min(cy + r / 2, 1.0)
        left, right = max(cx - r / 2, 0.0), min(cx + r / 2, 1.0)
        return Mix(partner, lam, (top, left, bottom - top, right - left))
