"""Multi-label on real pixels: 2x2 mosaics of four CIFAR-10 tiles, labelled with the set of classes they show.

    python benchmarks/multilabel.py --cifar ../shared/data/cifar10 --out /tmp/mosaics --count 2000
    python benchmarks/multilabel.py --benchmark --out /tmp/ml-bench --count 1000 --test-count 500 --seeds 3

`build_mosaics` writes OUT/images/NNNNN.png (64x64, four 32x32 tiles from CIFAR-10's SPLIT folder) and
OUT/labels.csv with columns `path,labels`: the path relative to the csv, the labels the sorted set of
classes present joined by ';'. Each mosaic first draws how many distinct classes it holds (1 to 4, equally
likely), then which classes, then which tile shows which class (every drawn class at least once); the same
seed gives the same mosaics, byte for byte. Nothing is written beside the CIFAR folder, and nothing of this
data set is committed: tests and the benchmark build it where they need it.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path

TILE = 32
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def cifar_tiles(cifar_root: Path, split: str) -> dict[str, list[Path]]:
    """Class name -> its image files (sorted) in cifar_root/split/<class>/."""
    folder = Path(cifar_root) / split
    if not folder.is_dir():
        raise SystemExit(f"multilabel: no CIFAR-10 {split} folder at {folder}; pass --cifar the folder that holds "
                         f"train/ and test/")
    tiles = {c.name: sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
             for c in sorted(folder.iterdir()) if c.is_dir()}
    tiles = {c: files for c, files in tiles.items() if files}
    if len(tiles) < 4:
        raise SystemExit(f"multilabel: {folder} holds {len(tiles)} class folders with images; a mosaic needs 4")
    return tiles


def draw_mosaic(rng: random.Random, tiles: dict[str, list[Path]]) -> list[tuple[str, Path]]:
    """Four (class, tile file) pairs in reading order: 1-4 distinct classes, each shown at least once."""
    count = rng.randint(1, 4)
    chosen = rng.sample(sorted(tiles), count)
    order = chosen + [rng.choice(chosen) for _ in range(4 - count)]
    rng.shuffle(order)
    return [(c, rng.choice(tiles[c])) for c in order]


def build_mosaics(cifar_root: Path, out: Path, count: int, seed: int, split: str = "test") -> Path:
    """Write `count` mosaics under out/images/ and return out/labels.csv (columns path,labels)."""
    from PIL import Image

    tiles = cifar_tiles(cifar_root, split)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        picks = draw_mosaic(rng, tiles)
        mosaic = Image.new("RGB", (2 * TILE, 2 * TILE))
        for k, (_, file) in enumerate(picks):
            with Image.open(file) as tile:
                mosaic.paste(tile.convert("RGB").resize((TILE, TILE)), ((k % 2) * TILE, (k // 2) * TILE))
        name = f"images/{i:05d}.png"
        mosaic.save(out / name)
        rows.append((name, ";".join(sorted({c for c, _ in picks}))))
    table = out / "labels.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels"])
        writer.writerows(rows)
    return table


def build_benchmark_set(cifar_root: Path, out: Path, train: int, test: int, seed: int) -> Path:
    """Mosaics of CIFAR-10's train tiles (split train) and of its test tiles (split test) in one table,
    out/labels.csv with columns path,labels,split: no tile of a test mosaic is ever seen in training."""
    tables = {split: build_mosaics(cifar_root, Path(out) / split, count, seed, split)
              for split, count in (("train", train), ("test", test))}
    table = Path(out) / "labels.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "split"])
        for split, part in tables.items():
            with part.open(newline="") as rows:
                for row in list(csv.reader(rows))[1:]:
                    writer.writerow([f"{split}/{row[0]}", row[1], split])
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cifar", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/cifar10")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="test")
    parser.add_argument("--benchmark", action="store_true", help="build --count training mosaics (CIFAR-10 train "
                        "tiles) and --test-count test mosaics (its test tiles), then compare the linear probe and "
                        "the default fine-tune over --seeds seeds with benchmarks/accuracy.py (mAP mean ± std)")
    parser.add_argument("--test-count", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="--benchmark: every figure as JSON")
    args = parser.parse_args(argv)
    if not args.benchmark:
        print(build_mosaics(args.cifar, args.out, args.count, args.seed, args.split))
        return 0
    table = build_benchmark_set(args.cifar, args.out / "data", args.count, args.test_count, args.seed)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import accuracy

    return accuracy.main(["--seeds", str(args.seeds), "--out", str(args.out / "runs"),
                          *(["--json", str(args.json)] if args.json else []),
                          "--compare", "linear probe=--strategy linear", "fine-tune=--strategy finetune",
                          "--", "--data", str(table)])


if __name__ == "__main__":
    raise SystemExit(main())
