"""How close lr-find's suggestion lands to the best lr of a sweep: a linear probe on cached features, per seed.

    PYTHONPATH=src .venv/bin/python benchmarks/lr_find_check.py --data ../shared/data/cifar10 --seeds 3
    PYTHONPATH=src .venv/bin/python benchmarks/lr_find_check.py --data fashion-mnist --no-flip --seeds 3

For each seed: `transferkit lr-find` with the train settings below, then `transferkit train` at each lr of a
grid (quarter decades, --lo to --hi) with the same settings; the sweep's best lr is the one with the highest
validation accuracy (the test split is only reported). It prints whether the suggestion is within a factor of 2
of the best lr, and how many of the seeds' suggestions were. The backbone's features are computed once and
cached; every run after the first trains the head on them, so the sweep takes seconds per lr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np

from transferkit import TrainConfig
from transferkit.training.fit import find_lr, train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--weights", default="IMAGENET1K_V1")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-train-images", type=int, default=5000)
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lo", type=float, default=1e-4)
    p.add_argument("--hi", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=Path("runs/lr-find-check"))
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args(argv)
    logging.getLogger("transferkit").setLevel(logging.WARNING)
    grid = np.logspace(math.log10(args.lo), math.log10(args.hi), round(4 * math.log10(args.hi / args.lo)) + 1)
    settings = dict(data=args.data, model=args.model, weights=args.weights, strategy="linear",
                    image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
                    max_train_images=args.max_train_images, flip=not args.no_flip)
    rows = []
    for seed in range(args.seeds):
        found = find_lr(TrainConfig.create(**settings, seed=seed, out=str(args.out / f"seed-{seed}" / "lr-find")))
        sweep = []
        for lr in grid:
            r = train(TrainConfig.create(**settings, seed=seed, lr=float(lr),
                                         out=str(args.out / f"seed-{seed}" / f"lr-{lr:.2e}")), overwrite=True)
            best_val = max(h["val_acc"] for h in r.history)
            sweep.append({"lr": float(lr), "val_acc": best_val, "test_acc": r.accuracy})
            print(f"  seed {seed} lr {lr:.2e}: val {100 * best_val:.2f}%  test {100 * r.accuracy:.2f}%", flush=True)
        best = max(sweep, key=lambda s: s["val_acc"])
        ratio = found.suggestion / best["lr"]
        s = np.asarray(found.smoothed)
        row = {"seed": seed, "suggestion": found.suggestion, "best_lr": best["lr"], "ratio": ratio,
               "within_2x": 0.5 <= ratio <= 2, "best_val_acc": best["val_acc"], "best_test_acc": best["test_acc"],
               "at_suggestion": min(sweep, key=lambda x: abs(math.log(x["lr"] / found.suggestion))),
               "lr_at_min_over_10": found.lrs[int(np.argmin(s))] / 10, "steps": len(found.lrs),
               "seconds": found.seconds, "sweep": sweep}
        rows.append(row)
        print(f"seed {seed}: suggestion {found.suggestion:.2e} ({len(found.lrs)} steps, {found.seconds:.1f} s), "
              f"sweep best {best['lr']:.2e} (val {100 * best['val_acc']:.2f}%), ratio {ratio:.2f}"
              f"{' within 2x' if row['within_2x'] else ''}; the grid's lr nearest the suggestion reached val "
              f"{100 * row['at_suggestion']['val_acc']:.2f}%", flush=True)
    hits = sum(r["within_2x"] for r in rows)
    print(f"{args.data}: the suggestion was within a factor of 2 of the sweep's best lr for {hits} of {len(rows)} "
          f"seeds")
    if args.json is not None:
        args.json.write_text(json.dumps({"settings": settings, "grid": grid.tolist(), "seeds": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
