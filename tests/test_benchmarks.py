"""The benchmark scripts keep working: the accuracy harness's figures are its runs' own."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT, needs_weights

TINY = ["--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--strategy", "linear", "--image-size", "32",
        "--epochs", "1", "--batch-size", "32", "--val-split", "0.1"]


def _script(*args: str, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([*map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def _accuracy_module():
    spec = importlib.util.spec_from_file_location("accuracy", ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_weights
def test_accuracy_harness_reports_mean_and_sample_std_of_its_run_folders(cifar_small, tmp_path):
    out, table = tmp_path / "runs", tmp_path / "acc.json"
    proc = _script(sys.executable, ROOT / "benchmarks" / "accuracy.py", "--seeds", "2", "--out", out, "--json", table,
                   "--", "--data", cifar_small, *TINY)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = json.loads(table.read_text())
    assert saved["machine"]["torch"] and "avx512_bf16" in saved["machine"]
    assert saved["machine"]["cpu"] in proc.stdout
    (recipe,) = saved["recipes"]
    folders = sorted((out / recipe["label"]).iterdir())
    assert [f.name for f in folders] == ["seed-0", "seed-1"]  # each seed in its own run folder
    accs = []
    for f in folders:
        assert f"seed: {f.name[-1]}" in (f / "config.yaml").read_text()
        accs.append(100 * json.loads((f / "report.json").read_text())["accuracy"])
    assert recipe["accuracy_mean"] == pytest.approx(statistics.fmean(accs))
    assert recipe["accuracy_std"] == pytest.approx(statistics.stdev(accs))
    assert recipe["seconds_mean"] > 0 and recipe["precision"] in (["bf16"], ["fp32"])
    assert f"| run | {recipe['accuracy_mean']:.2f} ± {recipe['accuracy_std']:.2f} |" in proc.stdout


@pytest.mark.parametrize("accuracies, measurable", [([(0.90, 0.92), (0.91, 0.93)], False),
                                                     ([(0.90, 0.91), (0.95, 0.96)], True)])
def test_accuracy_compare_says_no_measurable_difference_within_the_larger_spread(monkeypatch, tmp_path, capsys,
                                                                                 accuracies, measurable):
    acc = _accuracy_module()
    flags_seen = []

    def fake_run(flags, seed, out):  # the figures a recipe's run folders would hold
        flags_seen.append(flags)
        recipe = 0 if "--lr" in flags and flags[flags.index("--lr") + 1] == "1e-3" else 1
        return {"seed": seed, "out": str(out), "accuracy": accuracies[recipe][seed], "seconds": 10.0 + seed,
                "precision": "fp32", "measured_on": "test split"}

    monkeypatch.setattr(acc, "run_seed", fake_run)
    acc.main(["--seeds", "2", "--out", str(tmp_path), "--compare", "a=--lr 1e-3", "--lr 1e-2", "--", "--data", "x"])
    text = capsys.readouterr().out
    assert flags_seen[0] == ["--data", "x", "--lr", "1e-3"] and flags_seen[-1] == ["--data", "x", "--lr", "1e-2"]
    first = [100 * a for a in accuracies[0]]
    assert f"| a | {statistics.fmean(first):.2f} ± {statistics.stdev(first):.2f} |" in text
    assert ("no measurable difference" in text) != measurable
    assert ("better by 5.00 points" in text) == measurable


@needs_weights
def test_gpu_script_dry_run_runs_every_step_on_the_cpu(cifar_small, tmp_path):
    out = tmp_path / "gpu"
    proc = _script("bash", ROOT / "benchmarks" / "gpu.sh", "--dry-run", env={
        "OUT": str(out), "CIFAR": str(cifar_small), "PYTHON": sys.executable}, timeout=420)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == ["setup", "cuda_tests", "throughput", "fast"]
    assert all(s[1] == "0" for s in steps), (out / "summary.txt").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["fast"]["test_accuracy"] <= 1 and summary["fast"]["wall_seconds"] > 0
    assert any("classic" in line and "transferkit" in line for line in summary["throughput"])
    assert "skipped" in (out / "cuda_tests.log").read_text()  # no GPU in the dry run: the CUDA test skips


def test_the_depthwise_benchmark_prints_a_row_per_size_with_the_machine():
    proc = _script(sys.executable, ROOT / "benchmarks" / "depthwise.py", "--sizes", "32", "40", "--steps", "1",
                   "--batch", "8")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "avx512_bf16" in lines[0] and "batch 8," in lines[0]
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| 32 ") or line.startswith("| 40 ")]
    assert [r[0].strip() for r in rows] == ["32", "40"]
    for r in rows:  # three step times in ms, each with its time per image
        for cell in r[1:]:
            step, per_image = cell.split()
            assert float(step) > 0 and float(per_image.strip("()")) == pytest.approx(float(step) / 8, abs=0.1)
    proc = _script(sys.executable, ROOT / "benchmarks" / "depthwise.py", "--batch", "0")
    assert proc.returncode == 2 and "--batch 0" in proc.stderr
