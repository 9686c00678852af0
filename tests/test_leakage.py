"""Leakage: the same image file (same bytes) in train and in val/test is found, named, and dropped with --dedupe."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest import SHARED_CIFAR, link_subset, needs_cifar, run_cli
from transferkit import TrainConfig, train
from transferkit.data import sources
from transferkit.data.preprocess import Preprocessing
from transferkit.data.sources import load_source, train_val_test
from transferkit.errors import TransferkitError

STORE = Preprocessing(32, 37)
CLASSES = ["cat", "dog", "ship"]


@pytest.fixture
def leaky(tmp_path) -> tuple[Path, list[tuple[str, str]]]:
    """root/train (8 per class) and root/test (4 per class) of CIFAR-10, plus four test files that are the
    bytes of training files: three copies under new names and one symlink to a training image's file."""
    if not (SHARED_CIFAR / "train").is_dir():
        pytest.skip(f"shared CIFAR-10 folder not found at {SHARED_CIFAR}")
    root = tmp_path / "leaky"
    link_subset(SHARED_CIFAR / "train", root / "train", 8, CLASSES)
    link_subset(SHARED_CIFAR / "test", root / "test", 4, CLASSES)
    pairs = []
    for c, i in (("cat", 0), ("dog", 3), ("ship", 5)):
        original = sorted((root / "train" / c).iterdir())[i]
        copy = root / "test" / c / f"copy-{i}.jpg"
        copy.write_bytes(original.read_bytes())
        pairs.append((f"train/{c}/{original.name}", f"test/{c}/{copy.name}"))
    original = sorted((root / "train" / "dog").iterdir())[6]
    (root / "test" / "dog" / "link.jpg").symlink_to(original.resolve())  # the very same file: the same bytes
    pairs.append((f"train/dog/{original.name}", "test/dog/link.jpg"))
    return root, pairs


def _tiny(root: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig.create(data=str(root), model="resnet18", weights="none", strategy="linear", image_size=32,
                              epochs=1, batch_size=8, val_split=0.0, out=str(out), workers=1, **kw)


@needs_cifar
def test_copies_of_training_images_in_test_are_reported_with_their_paths(leaky, tmp_path, caplog):
    root, pairs = leaky
    caplog.set_level(logging.INFO, "transferkit")
    result = train(_tiny(root, tmp_path / "run"))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "copies" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert "4 of 16 test images" in warned[0]
    for train_path, test_path in pairs:
        assert f"{train_path} = {test_path}" in warned[0]
    assert "--dedupe" in warned[0]
    assert "16 images" in result.measured_on  # without --dedupe nothing is dropped, only said


@needs_cifar
@pytest.mark.parametrize("stream", ["never", "always"])
def test_dedupe_drops_exactly_the_copies_from_the_test_split(leaky, stream):
    root, _ = leaky
    src = load_source(str(root), preprocessing=STORE, splits=("train", "val", "test"), use_cache=False, stream=stream)
    src.train, src.val, src.test = train_val_test(src, 0.0, seed=0)  # all of train/ trains: the pairs stay pairs
    train_before = len(src.train)
    sources.check_leakage(src, dedupe=True)
    left = sorted(str(Path(f).relative_to(root)) for f in src.test.files)
    assert left == sorted(str(p.relative_to(root)) for p in (root / "test").rglob("*.jpg")
                          if not p.name.startswith(("copy-", "link")))
    assert len(src.test) == len(src.test.labels) == len(src.test.images) == len(src.test.images[:]) == 12
    assert len(src.train) == train_before  # the copies leave the evaluation split, never train


@needs_cifar
def test_dedupe_from_the_cli_says_what_it_dropped_and_the_report_counts_the_rest(leaky, tmp_path):
    root, _ = leaky
    out = tmp_path / "run"
    proc = run_cli("train", "--data", root, "--model", "resnet18", "--weights", "none", "--strategy", "linear",
                   "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "1", "--val-split", "0",
                   "--dedupe", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dropped 4 of 16 test images" in proc.stderr
    report = (out / "report.md").read_text()
    assert "test split of" in report and "12 images" in report


@needs_cifar
def test_a_file_copied_inside_train_is_found_across_train_and_the_carved_val(tmp_path, caplog):
    root = tmp_path / "flat"
    link_subset(SHARED_CIFAR / "train", root, 6, ["cat", "dog"])
    for f in sorted((root / "cat").iterdir()):
        (root / "cat" / f"dup-{f.name}").write_bytes(f.read_bytes())
    src = load_source(str(root), preprocessing=STORE, splits=("train", "val", "test"), use_cache=False)
    src.train, src.val, src.test = train_val_test(src, 0.5, seed=0)
    train_bytes = {Path(f).read_bytes() for f in src.train.files}
    expected = [f for f in src.val.files if Path(f).read_bytes() in train_bytes]  # counted from the files' bytes
    assert expected, "the seed should split some pair across train and val"
    sources.check_leakage(src, dedupe=False)
    assert f"{len(expected)} of {len(src.val)} val images" in caplog.text
    kept = len(src.val)
    sources.check_leakage(src, dedupe=True)
    assert len(src.val) == kept - len(expected) and not set(src.val.files) & set(expected)


@needs_cifar
def test_dedupe_refuses_to_leave_an_evaluation_split_empty(tmp_path):
    root = tmp_path / "all-copies"
    link_subset(SHARED_CIFAR / "train", root / "train", 3, ["cat", "dog"])
    for f in (root / "train").rglob("*.jpg"):
        (root / "test" / f.parent.name).mkdir(parents=True, exist_ok=True)
        (root / "test" / f.parent.name / f"copy-{f.name}").write_bytes(f.read_bytes())
    src = load_source(str(root), preprocessing=STORE, splits=("train", "val", "test"), use_cache=False)
    src.train, src.val, src.test = train_val_test(src, 0.0, seed=0)
    with pytest.raises(TransferkitError, match="all 6 test images .* copies of training images"):
        sources.check_leakage(src, dedupe=True)


@needs_cifar
def test_a_file_filed_under_two_classes_is_a_label_conflict_in_any_split_and_dedupe_drops_every_copy(
        tmp_path, caplog):
    """A cat photo also filed as a dog, once with both copies in train and once across train and test: each is
    named as a label conflict (not as leakage, which it is not: the answers differ). --dedupe drops every copy
    from every split, says so, records it in split.json, and eval RUN scores what the run scored."""
    import json

    root = tmp_path / "conflicts"
    link_subset(SHARED_CIFAR / "train", root / "train", 6, ["cat", "dog"])
    link_subset(SHARED_CIFAR / "test", root / "test", 3, ["cat", "dog"])
    cats = sorted((root / "train" / "cat").iterdir())
    (root / "train" / "dog" / "also-a-cat.jpg").write_bytes(cats[0].read_bytes())  # both copies in train
    (root / "test" / "dog" / "cat-again.jpg").write_bytes(cats[1].read_bytes())  # one in train, one in test
    caplog.set_level(logging.INFO, "transferkit")
    kept = train(_tiny(root, tmp_path / "kept"))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "conflict" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert f"train/cat/{cats[0].name} (cat) = train/dog/also-a-cat.jpg (dog)" in warned[0]
    assert f"train/cat/{cats[1].name} (cat) = test/dog/cat-again.jpg (dog)" in warned[0]
    assert "4 copies (3 in train, 1 in test)" in warned[0] and "--dedupe drops every copy" in warned[0]
    assert "copies of training images" not in caplog.text  # a conflict is not reported as leakage
    assert "7 images" in kept.measured_on  # said, nothing dropped
    caplog.clear()
    run = tmp_path / "deduped"
    deduped = train(_tiny(root, run, dedupe=True))
    assert "--dedupe: dropped all 4 copies from every split" in caplog.text
    assert "6 images" in deduped.measured_on
    record = json.loads((run / "split.json").read_text())
    assert record["train"]["images"] == 13 - 3 and record["label_conflicts"] == "dropped"
    proc = run_cli("eval", run, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["images"] == 6 and json.loads(proc.stdout)["accuracy"] == deduped.accuracy
