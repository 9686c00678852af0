"""Caches: decoded folders and frozen features are reused, exact, and never stale."""

from __future__ import annotations

import os

import pytest
import torch

import transferkit.data.folders as folders
import transferkit.data.preprocess as preprocess
from conftest import SHARED_CIFAR
from transferkit import TrainConfig, train
from transferkit.data.preprocess import Preprocessing
from transferkit.data.sources import load_source
from transferkit.data.transforms import EvalTransform
from transferkit.models import create_backbone
from transferkit.training.features import features

STORE = Preprocessing(32, 37)


@pytest.fixture
def folder(tmp_path):
    if not (SHARED_CIFAR / "train").is_dir():
        pytest.skip(f"shared CIFAR-10 folder not found at {SHARED_CIFAR}")
    root = tmp_path / "data"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for f in sorted((SHARED_CIFAR / "train" / c).iterdir())[:10]:
            (root / c / f.name).write_bytes(f.read_bytes())
    return root


def test_decoded_folder_is_read_from_the_cache_and_refreshed_when_a_file_changes(folder, monkeypatch):
    first = load_source(str(folder), preprocessing=STORE)
    real_read = preprocess.read_image
    monkeypatch.setattr(preprocess, "read_image", lambda *a: (_ for _ in ()).throw(AssertionError("decoded again")))
    second = load_source(str(folder), preprocessing=STORE)
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.train.labels,
                                                                                second.train.labels)
    monkeypatch.setattr(preprocess, "read_image", real_read)
    changed = sorted((folder / "cat").iterdir())[0]
    changed.write_bytes(sorted((folder / "dog").iterdir())[0].read_bytes())  # new content, new mtime
    os.utime(changed, ns=(1, 1))
    third = load_source(str(folder), preprocessing=STORE)
    assert not torch.equal(third.train.images, first.train.images)
    assert torch.equal(third.train.images[0], third.train.images[10])


def test_cached_features_equal_freshly_computed_ones(folder):
    bb = create_backbone("resnet18", "none", num_classes=2)
    split = load_source(str(folder), preprocessing=STORE).train
    tf = EvalTransform(Preprocessing(32, 37, (0.5,) * 3, (0.25,) * 3))
    kw = dict(device=torch.device("cpu"), precision="fp32", batch_size=8, identity={"arch": "resnet18", "seed": 1})
    computed = features(bb.model, bb.head, split, tf, **kw)
    cached = features(bb.model, bb.head, split, tf, **kw)
    fresh = features(bb.model, bb.head, split, tf, use_cache=False, **kw)
    assert cached.images.shape == (20, 512)
    assert torch.equal(computed.images, fresh.images) and torch.equal(cached.images, fresh.images)
    bb.model.fc = torch.nn.Identity()
    with torch.no_grad():
        direct = bb.model.eval()(tf(split.images))
    assert torch.allclose(direct, fresh.images, atol=1e-5)


def test_a_frozen_trunks_activations_are_computed_without_running_the_blocks_after_it(folder):
    """The activation cache of --trainable-blocks runs the frozen blocks alone: what follows them is not needed."""
    bb = create_backbone("resnet18", "none", num_classes=2)
    split = load_source(str(folder), preprocessing=STORE).train
    tf = EvalTransform(Preprocessing(32, 37, (0.5,) * 3, (0.25,) * 3))
    ran = []
    for name in ("layer2", "layer4", "fc"):
        bb.model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: ran.append(name))
    got = features(bb.model, bb.head, split, tf, device=torch.device("cpu"), precision="fp32", batch_size=8,
                   identity={"arch": "resnet18"}, use_cache=False, at="layer2")
    assert set(ran) == {"layer2"}
    with torch.no_grad():
        m = bb.model.eval()
        x = tf(split.images)
        direct = m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))
    assert got.images.shape == direct.shape == (20, 128, 4, 4)
    assert torch.allclose(direct, got.images, atol=1e-5)


def test_linear_probe_second_run_hits_both_caches(folder, tmp_path, caplog):
    cfg = TrainConfig.create(data=str(folder), model="resnet18", weights="none", strategy="linear", image_size=32,
                             epochs=2, batch_size=4, val_split=0.2, out=str(tmp_path / "a"), workers=1)
    a = train(cfg)
    assert "features of 16 images computed" in caplog.text
    caplog.clear()
    b = train(cfg.replace(out=str(tmp_path / "b")))
    assert "features of 16 images from the cache" in caplog.text and "decoded images from the cache" in caplog.text
    assert b.accuracy == a.accuracy and [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    # The saved model is the whole network: it predicts from images, not from features.
    from transferkit.predict import Predictor

    p = Predictor.from_run(tmp_path / "b", device="cpu")
    assert len(p.predict([sorted((folder / "cat").iterdir())[0]], topk=2)[0]) == 2


def test_content_hashes_are_cached_and_refreshed_when_a_file_changes(folder, monkeypatch):
    first = load_source(str(folder), preprocessing=STORE)
    assert len(first.train.hashes) == 20 and len(set(first.train.hashes)) == 20
    real_hash = folders.file_hash
    monkeypatch.setattr(folders, "file_hash", lambda p: (_ for _ in ()).throw(AssertionError("hashed again")))
    second = load_source(str(folder), preprocessing=STORE)
    assert second.train.hashes == first.train.hashes and second.train.files == first.train.files
    monkeypatch.setattr(folders, "file_hash", real_hash)
    changed = sorted((folder / "cat").iterdir())[0]
    changed.write_bytes(sorted((folder / "dog").iterdir())[0].read_bytes())  # now a copy of the first dog
    os.utime(changed, ns=(1, 1))
    third = load_source(str(folder), preprocessing=STORE)
    assert third.train.hashes[0] == third.train.hashes[10] != first.train.hashes[0]
