"""Imbalanced CIFAR-10: --sampler balanced against no sampler and --class-weights auto, 3 seeds each.

    .venv/bin/python benchmarks/imbalance.py [--per-class 200] [--rare cat] [--rare-count 20] [--size 64]

Train: the first --per-class images of each class of the shared CIFAR-10 folder, --rare-count of the rare
class (1/10 of the others); test: the whole test split (1,000 images a class). ImageNet MobileNetV2
(IMAGENET1K_V1, from this machine), linear probe on cached features (--strategy linear), no validation
split (--val-split 0: the last epoch is evaluated, so model selection adds no noise of its own).
Prints test balanced accuracy, accuracy and the rare class's recall, mean ± std (sample std) over the seeds.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
MODES = {"no sampler": {}, "--class-weights auto": {"class_weights": "auto"},
         "--sampler balanced": {"sampler": "balanced"}}


def build(root: Path, per_class: int, rare: str, rare_count: int) -> Path:
    """root/train (per_class a class, rare_count of `rare`) and root/test (all of it), as symlinks."""
    for split in ("train", "test"):
        for c in sorted(p.name for p in (DATA / split).iterdir() if p.is_dir()):
            (root / split / c).mkdir(parents=True)
            files = sorted((DATA / split / c).iterdir())
            if split == "train":
                files = files[:rare_count if c == rare else per_class]
            for f in files:
                (root / split / c / f.name).symlink_to(f)
    return root


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    bf16 = subprocess.run(["grep", "-qo", "avx512_bf16", "/proc/cpuinfo"]).returncode == 0
    return f"{cpu}, {os.cpu_count()} cores, avx512_bf16 {'yes' if bf16 else 'no'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--rare", default="cat")
    ap.add_argument("--rare-count", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("TRANSFERKIT_CACHE", str(Path(tmp) / "cache"))  # features computed once, for all runs
        from transferkit import TrainConfig, train

        data = build(Path(tmp) / "data", args.per_class, args.rare, args.rare_count)
        results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in MODES}
        precision = "?"
        for seed in args.seeds:
            for mode, extra in MODES.items():
                cfg = TrainConfig.create(data=str(data), model="mobilenet_v2", weights="IMAGENET1K_V1",
                                         strategy="linear", image_size=args.size, epochs=args.epochs, lr=args.lr,
                                         batch_size=64, val_split=0.0, seed=seed, out=str(Path(tmp) / f"{mode}-{seed}"),
                                         **extra)
                m = train(cfg).metrics
                rare = next(r["recall"] for r in m["per_class"] if r["class"] == args.rare)
                results[mode].append((m["balanced_accuracy"], m["accuracy"], rare))
                precision = cfg.precision if cfg.precision != "auto" else _precision(Path(cfg.out))
                print(f"  seed {seed}  {mode:<22} balanced accuracy {100 * m['balanced_accuracy']:.2f}%  "
                      f"accuracy {100 * m['accuracy']:.2f}%  {args.rare} recall {100 * rare:.1f}%", flush=True)

    def cell(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"

    print(f"\nImbalanced CIFAR-10: train {args.per_class} images a class, {args.rare} {args.rare_count}; test 1,000 a "
          f"class. MobileNetV2 IMAGENET1K_V1, linear probe on cached features, {args.size} px, {args.epochs} "
          f"epochs, AdamW lr {args.lr:g}, batch 64, seeds {' '.join(map(str, args.seeds))}.")
    print(f"Machine: {machine()}; precision {precision}.\n")
    print(f"| training | test balanced accuracy (%) | test accuracy (%) | {args.rare} recall (%) |")
    print("| --- | --- | --- | --- |")
    for mode, runs in results.items():
        print(f"| {mode} | {cell([r[0] for r in runs])} | {cell([r[1] for r in runs])} | "
              f"{cell([r[2] for r in runs])} |")


def _precision(run: Path) -> str:
    import json

    return json.loads((run / "model.json").read_text()).get("precision", "?")


if __name__ == "__main__":
    main()
