"""Data: folder layouts, stratified splits, named sets, and the batched transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_CIFAR, link_subset, needs_cifar, needs_fashion
from transferkit.data.preprocess import Preprocessing
from transferkit.data.sources import load_source, stratified_split, stratified_subset
from transferkit.data.transforms import TrainTransform, batches
from transferkit.errors import TransferkitError

STORE = Preprocessing(64, 73)


def test_stratified_split_is_seeded_and_keeps_class_balance():
    labels = torch.arange(10).repeat_interleave(50)
    keep, held = stratified_split(labels, 0.1, seed=3)
    assert torch.bincount(labels[held]).tolist() == [5] * 10
    assert set(keep.tolist()).isdisjoint(held.tolist()) and len(keep) + len(held) == 500
    assert torch.equal(held, stratified_split(labels, 0.1, seed=3)[1])
    assert not torch.equal(held, stratified_split(labels, 0.1, seed=4)[1])
    sub = stratified_subset(labels, 100, seed=0)
    assert torch.bincount(labels[sub]).tolist() == [10] * 10


@needs_cifar
def test_image_folder_layouts(tmp_path):
    flat = link_subset(SHARED_CIFAR / "train", tmp_path / "flat", 3, ["cat", "dog"])
    src = load_source(str(flat), preprocessing=STORE)
    assert src.classes == ["cat", "dog"] and len(src.train) == 6 and src.test is None
    assert src.train.images.shape == (6, 3, 32, 32) and src.train.images.dtype == torch.uint8

    split = tmp_path / "split"
    link_subset(SHARED_CIFAR / "train", split / "train", 4, ["cat", "dog"])
    link_subset(SHARED_CIFAR / "test", split / "test", 2, ["cat", "dog"])
    src = load_source(str(split), preprocessing=STORE, splits=("train", "val", "test"))
    assert len(src.train) == 8 and len(src.test) == 4 and src.val is None


def test_mixed_sizes_and_modes_are_stored_as_rgb_squares(tmp_path):
    images = {"a/0.png": ("L", (120, 80), 200), "a/1.png": ("L", (20, 30), 100),
              "b/0.png": ("RGBA", (50, 90), (10, 20, 30, 255)), "b/1.png": ("RGBA", (70, 70), (10, 20, 30, 0))}
    for name, (mode, size, color) in images.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new(mode, size, color).save(tmp_path / name)
    src = load_source(str(tmp_path), preprocessing=STORE)
    x = src.train.images.float()
    assert src.train.images.shape == (4, 3, 64, 64)  # small ones upscaled, large ones center-fitted
    assert x[0].mean().item() == pytest.approx(200, abs=1) and x[1].mean().item() == pytest.approx(100, abs=1)
    assert x[2, :, 32, 32].tolist() == [10, 20, 30]
    assert x[3, :, 32, 32].tolist() == [255, 255, 255]  # transparent pixels show as white


def test_bad_folders_are_explained(tmp_path):
    with pytest.raises(TransferkitError, match="no class folders"):
        load_source(str(tmp_path), preprocessing=STORE)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "test" / "dog").mkdir(parents=True)
    with pytest.raises(TransferkitError, match=r"missing \['cat'\], extra \['dog'\]"):
        load_source(str(tmp_path), preprocessing=STORE)
    with pytest.raises(TransferkitError, match="did you mean 'cifar10'"):
        load_source("cifar1O", preprocessing=STORE)


@needs_fashion
def test_fashion_mnist_from_the_debian_package():
    src = load_source("fashion-mnist", preprocessing=STORE, splits=("train", "test"))
    assert src.train.images.shape == (60000, 1, 28, 28) and len(src.test) == 10000
    assert torch.bincount(src.test.labels).tolist() == [1000] * 10
    assert src.classes[0] == "T-shirt/top" and src.classes[9] == "Ankle boot"


def test_grayscale_batches_become_three_channels_normalized():
    x = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    out = Preprocessing(64, 73, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).to_input(x)
    assert out.shape == (2, 3, 64, 64) and torch.allclose(out, torch.full_like(out, 2.0))


def test_eval_resize_matches_the_pil_reference_path():
    """The classic loop's PIL Resize((224, 224)) + ToTensor, against the batched upsample."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR), dtype=np.float32) / 255
    out = Preprocessing(224, 256, (0, 0, 0), (1, 1, 1)).to_input(torch.from_numpy(img).permute(2, 0, 1)[None])
    diff = np.abs(out[0].permute(1, 2, 0).numpy() - ref)
    assert diff.mean() < 0.01 and diff.max() < 0.06


def test_random_resized_crop_is_seeded_varied_and_flips():
    x = torch.arange(32, dtype=torch.uint8).repeat(4, 3, 32, 1)  # a horizontal ramp
    tf = TrainTransform(Preprocessing(32, 37, (0, 0, 0), (1, 1, 1)), scale=(0.3, 1.0))
    a = tf(x, torch.Generator().manual_seed(0))
    b = tf(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    slopes = (a[:, 0, 16, -1] - a[:, 0, 16, 0]).sign()
    flipped = tf(x.repeat(8, 1, 1, 1), torch.Generator().manual_seed(1))
    both = (flipped[:, 0, 16, -1] - flipped[:, 0, 16, 0]).sign().unique()
    assert set(both.tolist()) == {-1.0, 1.0} and slopes.abs().min() == 1


def test_batches_cover_every_image_once():
    from transferkit.data.sources import Split

    split = Split("train", torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10))
    seen = torch.cat([y for _, y in batches(split, 4, order=torch.randperm(10))])
    assert sorted(seen.tolist()) == list(range(10))


def test_a_link_loop_in_a_class_folder_lists_each_image_once_with_its_own_label(tmp_path, caplog):
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (20, 20), (60 * i, 100 if c == "cat" else 200, 0)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "dog" / "up").symlink_to("..")  # dog/up/cat/... would label cats as dogs, forever deeper
    (tmp_path / "cat" / "again").symlink_to(tmp_path / "cat")
    src = load_source(str(tmp_path), preprocessing=STORE, use_cache=False)
    assert len(src.train) == 6 and src.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert "reached again through links" in caplog.text and "dog/up" in caplog.text
