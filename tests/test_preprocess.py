"""One rule from file to model input: eval, predict and the Predictor agree; the memory estimate is
what is held; streamed and in-memory folders train alike whatever the images' size."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import SHARED_CIFAR, link_subset, needs_cifar, run_cli
from transferkit import TrainConfig, train
from transferkit.data.preprocess import Preprocessing
from transferkit.data.sources import load_source
from transferkit.predict import Predictor
from transferkit.training.engine import evaluate

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image not installed")
PHOTOS = {"cat": skimage_data.chelsea(), "cup": skimage_data.coffee()}


def _crops(photo: np.ndarray, sizes: list[tuple[int, int]], seed: int) -> list[Image.Image]:
    """Crops of a real photo at random places, resized to each (width, height)."""
    rng = np.random.default_rng(seed)
    h, w = photo.shape[:2]
    out = []
    for width, height in sizes:
        side = int(rng.integers(min(h, w) // 3, min(h, w)))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((width, height), Image.BILINEAR)
        out.append(crop)
    return out


def _folder(root, sizes: list[tuple[int, int]], seed: int = 0, ext: str = "png"):
    for c, photo in PHOTOS.items():
        (root / c).mkdir(parents=True)
        for i, img in enumerate(_crops(photo, sizes, seed)):
            img.save(root / c / f"{i}_{img.width}x{img.height}.{ext}")
    return root


@pytest.fixture(scope="module")
def run_28px(tmp_path_factory):
    """A run trained on 28x28 images (as Fashion-MNIST's) at 64 px, in fp32."""
    root = tmp_path_factory.mktemp("p28")
    _folder(root / "train", [(28, 28)] * 12)
    result = train(TrainConfig.create(data=str(root), model="resnet18", weights="none", image_size=64, epochs=1,
                                      batch_size=8, val_split=0.25, precision="fp32", workers=1,
                                      out=str(root.parent / "run28")))
    return result.out_dir


MIXED = [(16, 16), (28, 28), (40, 40), (64, 64), (100, 100), (50, 30), (30, 70)]  # smaller, equal, larger, odd


LARGE = [(1200, 900), (800, 800), (300, 1000), (140, 150)]  # decoded at 1/8, 1/8, 1/4 and full scale at 64 px


@pytest.mark.parametrize("sizes, ext", [(MIXED, "png"), ([(32, 32)] * 3, "png"), (LARGE, "jpg")],
                         ids=["mixed sizes", "all 32x32", "large JPEGs"])
def test_eval_predict_and_the_predictor_prepare_a_file_alike(run_28px, tmp_path, sizes, ext):
    data = _folder(tmp_path / "data" / "test", sizes, seed=1, ext=ext).parent
    files = sorted(str(p) for p in data.rglob(f"*.{ext}"))
    proc = run_cli("predict", run_28px, data, "--topk", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    cli = {r["file"]: {t["class"]: t["prob"] for t in r["top"]} for r in json.loads(proc.stdout)["predictions"]}
    predictor = Predictor.from_run(run_28px, device="cpu")
    api = {f: dict(top) for f, top in zip(files, predictor.predict(files, topk=2))}
    # What eval computes: the folder loaded as a split by the run's preprocessing, run in batches.
    split = load_source(str(data), preprocessing=predictor.preprocessing, splits=("test",)).test
    logits, labels = evaluate(predictor.model, split, predictor.preprocessing.to_input, batch_size=4,
                              device=torch.device("cpu"), precision="fp32")
    ordered = sorted(files, key=lambda f: (f.split("/")[-2], f))  # the split's order: by class, then name
    on_eval = {f: dict(zip(predictor.classes, p)) for f, p in zip(ordered, logits.softmax(1).tolist())}
    for f in files:
        for c in predictor.classes:
            assert cli[f][c] == pytest.approx(api[f][c], abs=1e-5), f
            assert on_eval[f][c] == pytest.approx(api[f][c], abs=1e-5), f
    # And `eval` itself counts what `predict` answers.
    proc = run_cli("eval", run_28px, "--data", data, "--json")
    assert proc.returncode == 0, proc.stderr
    confusion = [[0, 0], [0, 0]]
    for f in files:
        confusion[predictor.classes.index(f.split("/")[-2])][predictor.classes.index(max(cli[f], key=cli[f].get))] += 1
    assert json.loads(proc.stdout)["confusion"] == confusion


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_and_stored_as_from_full_size(tmp_path):
    """libjpeg's scaled decoding stops at the resize side, and the stored image barely differs from the
    full-size decode's (what the resize alone would give)."""
    from transferkit.data.images import open_rgb, pil_to_tensor

    photo = Image.fromarray(skimage_data.astronaut()).resize((2400, 1800), Image.BICUBIC)
    photo.save(tmp_path / "big.jpg", quality=92)
    pre = Preprocessing(64, 73)
    assert open_rgb(tmp_path / "big.jpg", pre.resize_size).size == (300, 225)  # 1/8: 2400 // 73 >= 8
    assert open_rgb(tmp_path / "big.jpg", 500).size == (1200, 900)  # 1/2: 1/4 would give 450 px, below 500
    scaled = pre.read(tmp_path / "big.jpg").float()
    full = pre.store(pil_to_tensor(open_rgb(tmp_path / "big.jpg"))).float()
    assert scaled.shape == full.shape == (3, 64, 64)
    assert (scaled - full).abs().mean() < 2.0, (scaled - full).abs().mean()
    # Files that are not JPEG, and JPEGs too small to scale, decode at full size.
    photo.save(tmp_path / "big.png")
    assert open_rgb(tmp_path / "big.png", pre.resize_size).size == (2400, 1800)
    photo.resize((140, 100)).save(tmp_path / "small.jpg")
    assert open_rgb(tmp_path / "small.jpg", pre.resize_size).size == (140, 100)


@pytest.mark.parametrize("sizes", [[(32, 32)] * 10, [(300, 200), (120, 160), (250, 250)] * 3],
                         ids=["small images", "large images"])
def test_the_memory_estimate_is_what_the_decoded_images_take(tmp_path, sizes, monkeypatch, caplog):
    from transferkit import runtime

    _folder(tmp_path / "d", sizes)
    pre = Preprocessing(224, 256)
    src = load_source(str(tmp_path / "d"), preprocessing=pre, splits=("train",), stream="never", use_cache=False)
    held = src.train.images.nbytes
    assert abs(src.stored_bytes - held) <= 0.05 * held, (src.stored_bytes, held)
    # With room for 1.5x what they take, the default keeps them in memory and says so.
    monkeypatch.setattr(runtime, "memory_bytes", lambda: int(4 * 1.5 * held))
    caplog.set_level(logging.INFO, "transferkit")
    auto = load_source(str(tmp_path / "d"), preprocessing=pre, splits=("train",), use_cache=False)
    assert not auto.train.streamed and "kept in memory" in caplog.text
    monkeypatch.setattr(runtime, "memory_bytes", lambda: int(4 * 0.5 * held))
    assert load_source(str(tmp_path / "d"), preprocessing=pre, splits=("train",), use_cache=False).train.streamed


def _same_weights(a, b):
    wa, wb = load_file(a.out_dir / "model.safetensors"), load_file(b.out_dir / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.accuracy == b.accuracy


@needs_cifar
def test_streamed_and_in_memory_train_alike_with_small_images_upsampled(tmp_path):
    data = tmp_path / "c"
    link_subset(SHARED_CIFAR / "train", data / "train", 10, ["cat", "ship"])
    link_subset(SHARED_CIFAR / "test", data / "test", 4, ["cat", "ship"])
    kw = dict(data=str(data), model="resnet18", weights="none", image_size=64, epochs=2, batch_size=8,
              val_split=0.25, precision="fp32", workers=1)
    in_memory = train(TrainConfig.create(**kw, stream="never", out=str(tmp_path / "m")))
    streamed = train(TrainConfig.create(**kw, stream="always", out=str(tmp_path / "s")))
    assert "stored at 32x32" in streamed.measured_on  # kept small, upsampled per batch
    _same_weights(in_memory, streamed)


def test_streamed_and_in_memory_train_alike_with_large_images_shrunk(tmp_path):
    _folder(tmp_path / "p", [(120, 90), (90, 120), (100, 100), (64, 48)] * 3)
    kw = dict(data=str(tmp_path / "p"), model="resnet18", weights="none", image_size=32, epochs=2, batch_size=8,
              val_split=0.25, precision="fp32", workers=1)
    in_memory = train(TrainConfig.create(**kw, stream="never", out=str(tmp_path / "m")))
    streamed = train(TrainConfig.create(**kw, stream="always", out=str(tmp_path / "s")))
    assert "stored at 32x32" in streamed.measured_on
    _same_weights(in_memory, streamed)


def test_a_long_strip_is_refused_by_the_one_rule_before_its_resize_takes_gigabytes(run_28px, tmp_path):
    """A strip one pixel wide would be resized to 73 x 219,000 pixels (at 224 px input: 5 GB and more). Every
    path refuses it by the one rule: predict answers it with an error row and still predicts the other file,
    a training folder lists it as unreadable, and an image passed in memory is refused; a real 6:1 panorama
    is not."""
    from transferkit.data.images import UnreadableImage

    strip = np.ascontiguousarray(np.tile(PHOTOS["cup"][200:201], (1, 5, 1)).transpose(1, 0, 2))  # 3000 x 1
    pano = PHOTOS["cup"][100:200]  # 100 x 600: 6:1
    Image.fromarray(strip).save(tmp_path / "strip.png")
    Image.fromarray(pano).save(tmp_path / "pano.png")
    proc = run_cli("predict", run_28px, tmp_path / "pano.png", tmp_path / "strip.png", "--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    out = json.loads(proc.stdout)
    assert [r["file"] for r in out["predictions"]] == [str(tmp_path / "pano.png")]
    (error,) = out["errors"]
    assert error["file"] == str(tmp_path / "strip.png") and "1x3000 pixels" in error["reason"]
    assert "20:1" in error["reason"] and "crop it" in error["reason"]
    with pytest.raises(UnreadableImage, match="20:1"):
        Predictor.from_run(run_28px, device="cpu").predict(strip)
    for c, i in (("cup", 0), ("cup", 1), ("cat", 0), ("cat", 1)):
        (tmp_path / "data" / c).mkdir(parents=True, exist_ok=True)
        Image.fromarray(PHOTOS[c][i * 100:i * 100 + 200, :200]).save(tmp_path / "data" / c / f"{i}.png")
    (tmp_path / "data" / "cup" / "strip.png").write_bytes((tmp_path / "strip.png").read_bytes())
    for stream in ("never", "always"):
        src = load_source(str(tmp_path / "data"), preprocessing=Preprocessing(224, 256), splits=("train",),
                          use_cache=False, stream=stream)
        assert len(src.train) == 4 and [p for p, _ in src.skipped] == [str(tmp_path / "data" / "cup" / "strip.png")]
        assert "20:1" in src.skipped[0][1]
