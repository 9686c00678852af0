"""Training throughput: the classic tutorial loop against transferkit's pipeline, same model and steps.

    .venv/bin/python benchmarks/throughput.py [--steps 8] [--size 224] [--models resnet18 mobilenet_v2] [--device cuda]

Classic: a folder dataset of PIL images, Resize((size, size)) + ToTensor, DataLoader(batch 64,
2 workers, shuffle), fp32 SGD. transferkit: its own training step (engine.train_one_epoch) on
images decoded once into a uint8 tensor, batched random-resized-crop + flip + normalize,
channels_last, precision auto (bf16 only where native), the batch in passes of --micro-batch
(auto: 16 images at 224 px on a CPU), fp32 SGD.
Random weights (throughput does not depend on them). Data: ../shared/data/cifar10/train (or --data).
On a GPU (--device cuda, the default where there is one) both loops train there; the classic one still
decodes and resizes on the CPU, as the tutorial does.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms

from transferkit.data.preprocess import Preprocessing
from transferkit.data.sources import load_source
from transferkit.data.transforms import TrainTransform, batches
from transferkit.runtime import pick_device, resolve_precision
from transferkit.training.engine import StepSetup, micro_batch_for, train_one_epoch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "train"


def sync(device: torch.device) -> None:
    if device.type == "cuda":  # GPU work is asynchronous: a clock read needs it finished
        torch.cuda.synchronize(device)


def timed_steps(step, loader, steps: int, device: torch.device, warmup: int = 2) -> float:
    """Images per second over `steps` steps after `warmup` untimed ones (data loading included)."""
    it = iter(loader)
    for _ in range(warmup):
        step(*next(it))
    sync(device)
    n, start = 0, time.perf_counter()
    for _ in range(steps):
        x, y = next(it)
        step(x, y)
        n += len(y)
    sync(device)
    return n / (time.perf_counter() - start)


def classic(arch: str, size: int, steps: int, batch: int, subset: list[int], device: torch.device,
            data: Path = DATA) -> float:
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    ds = torch.utils.data.Subset(torchvision.datasets.ImageFolder(str(data), transform=tf), subset)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=2, drop_last=True)
    model = torchvision.models.get_model(arch, num_classes=10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    model.train()

    def step(x, y):
        loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()

    return timed_steps(step, loader, steps, device)


def transferkit_pipeline(arch: str, size: int, steps: int, batch: int, count: int,
                         micro: int | None, device: torch.device, data: Path = DATA) -> tuple[float, str]:
    """transferkit's own training step (engine.train_one_epoch), as `transferkit train` runs it."""
    precision = resolve_precision("auto", device)
    pre = Preprocessing(size, round(size / 0.875))
    src = load_source(str(data.parent), preprocessing=pre, splits=("train",), max_train_images=count)
    setup = StepSetup(TrainTransform(pre, channels_last=True), device, precision, micro)
    model = torchvision.models.get_model(arch, num_classes=10).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(src.train), generator=gen)
    crops = torch.Generator(device=device).manual_seed(1)  # on the training device, as train's

    def run(first: int, n: int) -> float:
        """Images per second over n steps."""
        part = order[first * batch:(first + n) * batch]
        sync(device)
        start = time.perf_counter()
        images = sum(f.images for f in train_one_epoch(model, opt, sched, batches(src.train, batch, order=part,
                                                                                  drop_last=True), setup, crops))
        sync(device)
        return images / (time.perf_counter() - start)

    run(0, 2)  # warm-up
    return run(2, steps), precision


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    p.add_argument("--micro-batch", type=int, default=0, help="images per pass, as in train (0: auto)")
    p.add_argument("--device", default="auto", help="auto (cuda where there is one), cpu, cuda")
    p.add_argument("--data", type=Path, default=DATA.parent, help="a CIFAR-10 image folder with train/")
    args = p.parse_args()
    data = args.data / "train"
    if not data.is_dir():
        raise SystemExit(f"needs the shared CIFAR-10 folder at {data}")
    device = pick_device(args.device)
    count = (args.steps + 3) * args.batch_size
    images = sum(1 for _ in data.glob("*/*"))
    subset = torch.randperm(images, generator=torch.Generator().manual_seed(0))[:count].tolist()
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads{gpu}; {args.steps} steps of batch {args.batch_size} at {args.size} px")
    for arch in args.models:
        a = classic(arch, args.size, args.steps, args.batch_size, subset, device, data)
        micro = micro_batch_for(args.micro_batch, device, args.size)
        b, precision = transferkit_pipeline(arch, args.size, args.steps, args.batch_size, count, micro, device, data)
        passes = f", passes of {micro}" if micro and micro < args.batch_size else ""
        print(f"{arch:<14} classic {a:6.1f} img/s   transferkit ({precision}{passes}) {b:6.1f} img/s   "
              f"ratio {b / a:.2f}x", flush=True)


if __name__ == "__main__":
    main()
