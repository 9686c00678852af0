"""TrivialAugment, RandAugment and random erasing, batched: each image its own op and magnitude.

torchvision's `TrivialAugmentWide` / `RandAugment` draw one op for a whole batch tensor (or, called
per image, cost ~70 ms an image at 224 px on a 2-core CPU) and draw from the global generator. Here
every image of a float batch in [0, 1] gets its own op, magnitude and sign, drawn from the run's
generator by the caller's `rand`, and each op runs once on the rows that drew it. The ops and
magnitude ranges are torchvision's; translations are a fraction of the side (torchvision's
TrivialAugmentWide moves 32 px whatever the size), geometric ops resample bilinearly and fill black.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

# rand(k): (rows, k) uniforms in [0, 1), one row per image of the batch
Rand = Callable[[int], torch.Tensor]

OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness",
       "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
SIGNED = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
          "contrast", "sharpness")
BINS = 31  # torchvision's num_magnitude_bins
# torchvision's RandAugment defaults: 2 ops a image at magnitude 9 of 31
RANDAUGMENT_OPS, RANDAUGMENT_BIN = 2, 9


def _table(policy: str) -> torch.Tensor:
    """(len(OPS), BINS): each op's magnitude at each bin, as torchvision's policy of that name."""
    wide = policy == "trivialaugment"
    lin = lambda hi: torch.linspace(0.0, hi, BINS)  # noqa: E731
    shear, move, turn, enhance = ((0.99, 32 / 224, 135.0, 0.99) if wide
                                  else (0.3, 150 / 331, 30.0, 0.9))
    bits = 8 - (torch.arange(BINS) / ((BINS - 1) / (6 if wide else 4))).round()
    rows = {"shear_x": lin(shear), "shear_y": lin(shear),
            "translate_x": lin(move), "translate_y": lin(move), "rotate": lin(turn),
            "brightness": lin(enhance), "color": lin(enhance), "contrast": lin(enhance),
            "sharpness": lin(enhance), "posterize": bits,
            "solarize": torch.linspace(1.0, 0.0, BINS)}
    return torch.stack([rows.get(op, torch.zeros(BINS)) for op in OPS])


class Policy:
    """`trivialaugment` (one op a image, magnitude uniform over the bins)
    or `randaugment` (two ops at magnitude 9 of 31), on a float batch in [0, 1]."""

    def __init__(self, name: str) -> None:
        assert name in ("trivialaugment", "randaugment"), name
        self.name, self.table = name, _table(name)
        self.signed = torch.tensor([op in SIGNED for op in OPS])

    def __call__(self, x: torch.Tensor, rand: Rand) -> torch.Tensor:
        for _ in range(1 if self.name == "trivialaugment" else RANDAUGMENT_OPS):
            # op, magnitude bin, sign: drawn for every image whether or not it is used
            u = rand(3).cpu()
            op = (u[:, 0] * len(OPS)).long().clamp(max=len(OPS) - 1)
            bins = ((u[:, 1] * BINS).long().clamp(max=BINS - 1) if self.name == "trivialaugment"
                    else torch.full_like(op, RANDAUGMENT_BIN))
            m = self.table[op, bins] * torch.where(self.signed[op] & (u[:, 2] < 0.5), -1.0, 1.0)
            x = apply_ops(x, op, m)
        return x


def apply_ops(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Image i of `x` (float, [0, 1]; changed in place)
    after op OPS[op[i]] at magnitude m[i] (cpu tensors)."""
    out = x  # each row is read by its own op before that op writes it: no copy of the batch needed
    geometric = (op >= 1) & (op <= 5)
    if geometric.any():
        idx = geometric.nonzero().squeeze(1)
        out[idx.to(x.device)] = _affine(x[idx.to(x.device)], op[idx], m[idx])
    for k in range(6, len(OPS)):
        idx = (op == k).nonzero().squeeze(1)
        if len(idx):
            rows = idx.to(x.device)
            out[rows] = _COLOR[OPS[k]](x[rows], m[idx].to(x.device).view(-1, 1, 1, 1)).clamp_(0, 1)
    return out


def _affine(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Shear, translate (m: a fraction of the side)
    or rotate (m: degrees) about the centre; black fill."""
    # one op a row: the others are 0
    at = lambda k: torch.where(op == OPS.index(k), m, 0.0)  # noqa: E731
    a = torch.deg2rad(at("rotate"))
    theta = torch.stack([torch.cos(a), at("shear_x") - torch.sin(a), 2 * at("translate_x"),
                         torch.sin(a) + at("shear_y"), torch.cos(a), 2 * at("translate_y")],
                        1).view(-1, 2, 3)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(x: torch.Tensor, other: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """torchvision's enhance ops: factor 1 + m between `other` (factor 0) and `x` (factor 1)."""
    return other + (1 + m) * (x - other)


def _sharpness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(c, 1, 3, 3)
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)  # PIL keeps the border pixels
    return _blend(x, smooth, m)


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    step = 2.0 ** (8 - bits)
    return torch.floor((x * 255).round() / step) * step / 255


def _autocontrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    flat = hi <= lo  # a channel of one value stays as it is
    return torch.where(flat, x, (x - lo) / torch.where(flat, 1.0, hi - lo))


def _equalize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Histogram equalization of each channel of each
    image on 256 levels, as PIL's ImageOps.equalize."""
    n, c, h, w = x.shape
    v = (x * 255).round().long().reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(
        1, v, torch.ones_like(v))
    last = hist.gather(1, v.amax(1, keepdim=True))  # pixels at the top level present
    step = (h * w - last) // 255
    lut = (torch.cumsum(hist, 1)[:, :-1] + step // 2) // step.clamp(min=1)
    lut = F.pad(lut, (1, 0)).clamp(0, 255)
    out = torch.where(step > 0, lut.gather(1, v), v)
    return out.reshape(n, c, h, w).to(x.dtype) / 255


_COLOR: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "brightness": lambda x, m: x * (1 + m),
    "color": lambda x, m: _blend(x, _gray(x), m),
    "contrast": lambda x, m: _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), m),
    "sharpness": _sharpness,
    "posterize": _posterize,
    "solarize": lambda x, m: torch.where(x >= m, 1 - x, x),
    "autocontrast": _autocontrast,
    "equalize": _equalize,
}


def random_erasing(x: torch.Tensor, p: float, rand: Rand) -> torch.Tensor:
    """Each image, with probability p, gets one rectangle (2-33% of its area, aspect 0.3-3.3)
    set to 0: the mean pixel of normalized input (torchvision's RandomErasing defaults)."""
    u = rand(5).to(x.device)
    n, _, h, w = x.shape
    area = 0.02 + (1 / 3 - 0.02) * u[:, 1]
    ratio = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * u[:, 2])
    eh = (torch.sqrt(area * ratio) * h).round().clamp(1, h)
    ew = (torch.sqrt(area / ratio) * w).round().clamp(1, w)
    top, left = (u[:, 3] * (h - eh + 1)).floor(), (u[:, 4] * (w - ew + 1)).floor()
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((ys >= top.view(-1, 1, 1)) & (ys < (top + eh).view(-1, 1, 1))
              & (xs >= left.view(-1, 1, 1)) & (xs < (left + ew).view(-1, 1, 1))
              & (u[:, 0] < p).view(-1, 1, 1))
    return x.masked_fill(inside.unsqueeze(1), 0.0)
