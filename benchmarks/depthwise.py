"""One training step of MobileNetV2 on a CPU: bf16 as torch runs it, bf16 with depthwise convolutions in fp32
(what transferkit trains with: runtime.depthwise_in_fp32), and fp32.

    .venv/bin/python benchmarks/depthwise.py [--sizes 224 112 64 48] [--steps 6] [--model mobilenet_v2] [--batch 64]

Random weights and input (the speed does not depend on them), channels_last, AdamW, batch 64 (--batch) in passes of
transferkit's automatic size (16 images at 224 px, the whole batch at 64 px and below). Prints the median
step time of each, with the machine.
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from accuracy import machine  # this folder's figure harness: the same machine line
from recipes import median_ms

from transferkit.runtime import depthwise_in_fp32
from transferkit.training.engine import micro_batch_for

CPU = torch.device("cpu")


def step_ms(model_name: str, size: int, precision: str, fp32_depthwise: bool, steps: int, batch: int = 64) -> float:
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(num_classes=10).to(memory_format=torch.channels_last)
    if fp32_depthwise:
        depthwise_in_fp32(model, CPU, precision)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    micro = micro_batch_for(0, CPU, size)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for i in range(0, batch, micro):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = torch.nn.functional.cross_entropy(model(x[i:i + micro]), y[i:i + micro])
            loss.backward()
        opt.step()

    step()  # oneDNN picks and caches its kernels on the first calls (median_ms makes one more)
    return median_ms(step, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 112, 64, 48])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--batch", type=int, default=64, help="images per step")
    args = ap.parse_args()
    if args.batch < 1:
        ap.error(f"--batch {args.batch}: a step needs at least one image")
    if args.model not in torchvision.models.list_models(module=torchvision.models):
        ap.error(f"--model {args.model} is not a torchvision classification model (e.g. mobilenet_v2, "
                 "efficientnet_b0, convnext_tiny)")
    where = machine()
    print(f"machine: {where['cpu']}, {where['cores']} cores, avx512_bf16 {'yes' if where['avx512_bf16'] else 'no'}, "
          f"amx_bf16 {'yes' if where['amx_bf16'] else 'no'}; torch {where['torch']}; {args.model}, batch {args.batch}, "
          f"median of {args.steps} steps: ms per step (ms per image)")
    print("| px | bf16 | bf16, depthwise in fp32 | fp32 |\n| ---: | ---: | ---: | ---: |")
    for size in args.sizes:
        cells = [step_ms(args.model, size, p, dw, args.steps, args.batch) for p, dw in (("bf16", False), ("bf16", True),
                                                                                        ("fp32", False))]
        print(f"| {size} | " + " | ".join(f"{c:.0f} ({c / args.batch:.2f})" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
