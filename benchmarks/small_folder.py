"""Build a small real-photo folder (train/<class>/, test/<class>/ of symlinks) from the shared CIFAR-10 folder.

The small-data benchmark of benchmarks/RESULTS.md ("Small folders and the default strategy"): a
few hundred real 32 px photos in two classes, the case where a user's default command should not
spend minutes fine-tuning what a linear probe learns in seconds.

    python benchmarks/small_folder.py /tmp/catdog --classes cat dog --train 200 --test 500
    python benchmarks/accuracy.py --seeds 3 -- --data /tmp/catdog
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def build(out: Path, classes: list[str], train: int, test: int, source: Path = SHARED) -> Path:
    """`out`/train and `out`/test with the first `train` / `test` images of each class, linked, not copied."""
    for split, n in (("train", train), ("test", test)):
        for c in classes:
            files = sorted((source / split / c).iterdir())[:n]
            if len(files) < n:
                sys.exit(f"{source / split / c} holds {len(files)} images, fewer than the {n} asked for")
            (out / split / c).mkdir(parents=True, exist_ok=True)
            for f in files:
                link = out / split / c / f.name
                if not link.exists():
                    link.symlink_to(f)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--classes", nargs="+", default=["cat", "dog"])
    p.add_argument("--train", type=int, default=200, help="training images per class (val is carved from them)")
    p.add_argument("--test", type=int, default=500, help="test images per class")
    p.add_argument("--source", type=Path, default=SHARED, help="a CIFAR-10 image folder with train/ and test/")
    a = p.parse_args()
    if not (a.source / "train").is_dir():
        sys.exit(f"no CIFAR-10 image folder at {a.source} (pass --source)")
    print(build(a.out, a.classes, a.train, a.test, a.source))


if __name__ == "__main__":
    main()
