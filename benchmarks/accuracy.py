"""Accuracy with error bars: a recipe (any `transferkit train` flags) over N seeds, mean ± std of test accuracy
and wall time, with the machine it ran on.

    python benchmarks/accuracy.py --seeds 3 -- --recipe fast --data ../shared/data/cifar10
    python benchmarks/accuracy.py --seeds 3 --compare "--recipe fast" "fast+ema=--recipe fast --ema 0.999" \
        -- --data ../shared/data/cifar10

Flags after `--` go to every run. With --compare, each argument is one recipe's own flags (`LABEL=FLAGS`, or
the flags alone, which then label it). Each seed trains in its own run folder (--out DIR/LABEL/seed-S, replaced
when it exists) with --seed S; the test accuracy is read back from that folder's report.json, the wall time is
the whole `transferkit train` process (start-up, data, features, training, evaluation). The standard deviation
is the sample one (n - 1), as airbench reports it. Two recipes whose difference of means is smaller than the
larger of their two standard deviations are reported as "no measurable difference".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """The CPU model, whether it has native bf16 (AVX512-BF16/AMX), cores, torch version, GPU if any."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    import torch

    return {
        "cpu": model[1].strip() if model else platform.processor() or platform.machine(),
        "avx512_bf16": "avx512_bf16" in info, "amx_bf16": "amx_bf16" in info, "cores": os.cpu_count(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run_seed(flags: list[str], seed: int, out: Path) -> dict[str, Any]:
    """One `transferkit train` run; its test figures from report.json, its precision from model.json."""
    cmd = [sys.executable, "-m", "transferkit", "-q", "train", *flags, "--seed", str(seed), "--out", str(out),
           "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"accuracy: seed {seed} failed (exit {proc.returncode}): {shlex.join(cmd)}\n"
                         f"{proc.stderr.strip()[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    card = json.loads((out / "model.json").read_text())
    multilabel = report.get("task") == "multilabel"  # its headline is mAP, held in "accuracy" here
    return {"seed": seed, "out": str(out), "accuracy": report["map" if multilabel else "accuracy"],
            "metric": "mAP" if multilabel else "accuracy", "seconds": seconds,
            "precision": card.get("precision"), "measured_on": report.get("measured_on")}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(label: str, flags: list[str], runs: list[dict[str, Any]]) -> dict[str, Any]:
    acc, acc_std = mean_std([100 * r["accuracy"] for r in runs])
    sec, sec_std = mean_std([r["seconds"] for r in runs])
    return {"label": label, "flags": shlex.join(flags), "seeds": [r["seed"] for r in runs],
            "metric": runs[0].get("metric", "accuracy"), "accuracy_mean": acc,
            "accuracy_std": acc_std, "seconds_mean": sec, "seconds_std": sec_std,
            "precision": sorted({str(r["precision"]) for r in runs}), "runs": runs}


def verdict(a: dict[str, Any], b: dict[str, Any]) -> str:
    """b against a: which is better and by how much, or "no measurable difference" within the larger spread."""
    diff = b["accuracy_mean"] - a["accuracy_mean"]
    spread = max(a["accuracy_std"], b["accuracy_std"])
    if abs(diff) <= spread:
        return (f"{b['label']} vs {a['label']}: no measurable difference ({diff:+.2f} points, within the spread "
                f"of {spread:.2f})")
    return (f"{b['label']} vs {a['label']}: {'better' if diff > 0 else 'worse'} by {abs(diff):.2f} points "
            f"(larger than the spread of {spread:.2f})")


def recipes(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(label, flags) of each recipe to run; the common flags after `--` come first."""
    common = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    if not args.compare:
        return [("run", common)]
    out = []
    for item in args.compare:
        label, sep, flags = item.partition("=")
        if not sep or label.lstrip().startswith("-"):  # flags alone ('--lr=0.1' too): they label it
            label, flags = item.strip() or "defaults", item
        out.append((label, common + shlex.split(flags)))
    return out


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", label).strip("_") or "run"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                usage="accuracy.py [--seeds N] [--compare R1 R2 ...] [--json OUT] -- TRAIN FLAGS")
    p.add_argument("--seeds", type=int, default=3, help="runs per recipe, seeds FIRST .. FIRST+N-1 (default: 3)")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed (default: 0)")
    p.add_argument("--out", type=Path, default=Path("runs/accuracy"), help="the runs go to OUT/LABEL/seed-S "
                   "(default: runs/accuracy)")
    p.add_argument("--compare", nargs="+", metavar="RECIPE", help="two or more recipes, each 'LABEL=FLAGS' or "
                   "'FLAGS', compared in one table")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write every figure as JSON to OUT")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="`transferkit train` flags for every run, after --")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    if args.compare is not None and len(args.compare) < 2:
        p.error("--compare needs two or more recipes")
    where = machine()
    print(f"machine: {where['cpu']}, {where['cores']} cores, avx512_bf16 {'yes' if where['avx512_bf16'] else 'no'}"
          f"{', GPU ' + where['gpu'] if where['gpu'] else ''}; torch {where['torch']}", flush=True)
    results = []
    for label, flags in recipes(args):
        runs = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            r = run_seed(flags, seed, args.out / slug(label) / f"seed-{seed}")
            print(f"  {label} seed {seed}: {100 * r['accuracy']:.2f}% in {r['seconds']:.1f} s "
                  f"({r['precision']})", flush=True)
            runs.append(r)
        results.append(summarize(label, flags, runs))
    print(f"\n| recipe | test {results[0]['metric']} (%) | wall time (s) | seeds | precision |\n"
          "| --- | --- | --- | --- | --- |")
    for s in results:
        print(f"| {s['label']} | {s['accuracy_mean']:.2f} ± {s['accuracy_std']:.2f} | "
              f"{s['seconds_mean']:.1f} ± {s['seconds_std']:.1f} | {len(s['seeds'])} | {', '.join(s['precision'])} |")
    verdicts = [verdict(results[0], s) for s in results[1:]]
    for line in verdicts:
        print(line)
    print(f"(mean ± sample std over seeds {args.first_seed}..{args.first_seed + args.seeds - 1}; measured on "
          f"{results[0]['runs'][0]['measured_on']})")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": where, "recipes": results, "verdicts": verdicts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
