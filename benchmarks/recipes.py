"""What each training-recipe option costs per step: ms per batch, beside one training step of the model.

    PYTHONPATH=src .venv/bin/python benchmarks/recipes.py [--sizes 224 112 64] [--batch 64] [--repeat 5]
        [--model mobilenet_v2] [--no-step]

Times, on the CPU (or --device), the training transform of a batch of uint8 images (scikit-image's photos,
resized): random-resized crop + flip (today's --augment), then with --augment-policy trivialaugment /
randaugment, --random-erasing 0.25, --mixup/--cutmix (the partners' transform and the blend), and the --ema
update of the model's weights; and, for scale, one whole training step of the model on that batch (forward and
backward in the passes a CPU run uses, precision auto). Median of --repeat runs after one warm-up.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torchvision
from skimage import data as photos
from torchvision.transforms.v2 import functional as TF

from transferkit.data.mixing import Mixing
from transferkit.data.preprocess import Preprocessing
from transferkit.data.transforms import TrainTransform
from transferkit.runtime import resolve_precision
from transferkit.training.averaging import WeightAverage
from transferkit.training.engine import StepSetup, micro_batch_for, train_step


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def photo_batch(n: int, side: int) -> torch.Tensor:
    pics = [photos.astronaut(), photos.chelsea(), photos.coffee(), photos.rocket(), photos.immunohistochemistry()]
    x = torch.stack([TF.resize(torch.from_numpy(p).permute(2, 0, 1), [side, side], antialias=True) for p in pics])
    return x.repeat((n + len(pics) - 1) // len(pics), 1, 1, 1)[:n].contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 112, 64])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-step", action="store_true", help="skip timing the training step itself")
    args = ap.parse_args()
    device = torch.device(args.device)
    precision = resolve_precision("auto", device)
    flags = open("/proc/cpuinfo").read() if platform.system() == "Linux" else ""
    cpu = ", ".join(f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f in flags)
    print(f"# {platform.processor() or platform.machine()} ({cpu}), {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {device}, precision {precision}, batch {args.batch}, median of {args.repeat}")
    model = torchvision.models.get_model(args.model, num_classes=10).to(device).to(memory_format=torch.channels_last)
    ema = WeightAverage(model, 0.999)
    ema_ms = median_ms(lambda: ema.update(model), args.repeat)
    print("| px | crop+flip | + trivialaugment | + randaugment | + random erasing 0.25 | + mixup/cutmix | "
          f"+ ema ({args.model}) | training step ({args.model}) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        figures = row(size, args.batch, args.repeat, model, device, precision, not args.no_step)
        took = figures.pop()
        print(f"| {size} | " + " | ".join(figures) + f" | +{ema_ms:.0f} | {took} |", flush=True)


def row(size: int, batch: int, repeat: int, model: torch.nn.Module, device: torch.device, precision: str,
        step: bool) -> list[str]:
    """ms per batch: crop+flip, what each option adds to it, and (last) the training step."""
    pre = Preprocessing(image_size=size, resize_size=size)
    x = photo_batch(batch, size).to(device)
    g = torch.Generator(device=device).manual_seed(0)

    def timed(**kw) -> float:
        tf = TrainTransform(pre, channels_last=True, **kw)
        return median_ms(lambda: tf(x, g), repeat)

    base = timed()
    ta, ra, er = timed(policy="trivialaugment"), timed(policy="randaugment"), timed(erasing=0.25)
    tf, mixing = TrainTransform(pre, channels_last=True), Mixing(mixup=0.2, cutmix=1.0)

    def mixed() -> None:  # what a mixed step adds: the draw, the partners' transform, the blend
        mix = mixing.draw(batch, g)
        mix.apply(tf(x, g), tf(x[mix.partner], g))

    mix_ms = median_ms(mixed, repeat) - base
    took = "-"
    if step:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        setup = StepSetup(tf, device, precision, micro_batch_for(0, device, size))
        labels = torch.arange(batch) % 10
        took = f"{median_ms(lambda: train_step(model, opt, sched, x, labels, setup, g), max(1, repeat // 2)):.0f}"
    return [f"{base:.0f}", f"+{ta - base:.0f}", f"+{ra - base:.0f}", f"+{er - base:.0f}", f"+{mix_ms:.0f}", took]


if __name__ == "__main__":
    main()
