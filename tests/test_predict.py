"""Pretrained weights with their own preprocessing on real photos; checkpoints round-trip exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import needs_weights, run_cli
from transferkit.checkpoint import ModelCard, load_model_state, read_card, save_model
from transferkit.data.preprocess import Preprocessing
from transferkit.errors import TransferkitError
from transferkit.models import create_backbone, rebuild
from transferkit.predict import Predictor


@needs_weights
def test_pretrained_mobilenet_names_real_photos():
    """Weights + their own preprocessing: the ImageNet model must see a cat and an espresso."""
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image not installed")
    from PIL import Image

    p = Predictor.from_pretrained("mobilenet_v2", "IMAGENET1K_V1", device="cpu")
    cat, coffee = p.predict([Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee())], topk=3)
    assert cat[0][0] in {"tabby", "tiger cat", "Egyptian cat"}, cat
    assert coffee[0][0] == "espresso", coffee


def test_checkpoint_round_trip_gives_identical_logits_and_detects_damage(tmp_path):
    bb = create_backbone("resnet18", "none", num_classes=4)
    model = bb.model.eval()
    save_model(tmp_path, model, ModelCard("resnet18", bb.head, list("abcd"), Preprocessing()))
    back = rebuild("resnet18", bb.head, 4)
    back.load_state_dict(load_model_state(tmp_path, read_card(tmp_path)))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), back.eval()(x))

    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TransferkitError, match="truncated or was altered"):
        load_model_state(tmp_path, read_card(tmp_path))


def test_a_run_folder_of_the_previous_format_still_predicts(tmp_path):
    """model.json as version 0.1 wrote it (format 1: flat fields, native_size) loads into the model card."""
    bb = create_backbone("resnet18", "none", num_classes=3)
    pre = Preprocessing(48, 55, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    card = save_model(tmp_path, bb.model.eval(), ModelCard("resnet18", bb.head, ["a", "b", "c"], pre))
    new = Predictor.from_run(tmp_path, device="cpu").predict([torch.full((3, 40, 60), 90, dtype=torch.uint8)], topk=3)
    old = {"format": 1, "arch": "resnet18", "num_classes": 3, "classes": ["a", "b", "c"], "head": bb.head,
           "build_kwargs": {}, "image_size": 48, "resize_size": 55, "mean": [0.5] * 3, "std": [0.25] * 3,
           "native_size": [32, 32], "weights": "none (random init)", "data": "x", "strategy": "finetune",
           "precision": "fp32", "versions": {"transferkit": "0.1.0"}, "sha256": card.sha256}
    (tmp_path / "model.json").write_text(json.dumps(old))
    loaded = read_card(tmp_path)
    assert loaded.preprocessing == pre and loaded.num_classes == 3 and loaded.sha256 == card.sha256
    again = Predictor.from_run(tmp_path, device="cpu").predict([torch.full((3, 40, 60), 90, dtype=torch.uint8)], topk=3)
    assert again == new
    (tmp_path / "model.json").write_text(json.dumps({"format": 1, "arch": "resnet18"}))
    with pytest.raises(TransferkitError, match="model.json is damaged"):
        Predictor.from_run(tmp_path)


@pytest.fixture
def run(tmp_path):
    bb = create_backbone("resnet18", "none", num_classes=3)
    save_model(tmp_path, bb.model.eval(), ModelCard("resnet18", bb.head, ["a", "b", "c"], Preprocessing(32, 37)))
    return tmp_path


@pytest.mark.parametrize(("field", "value"), [
    ("image_size", 0), ("image_size", -5), ("mean", [0.5, 0.5]), ("std", [0, 0, 0]), ("arch", "resnet999"),
    ("arch", "resnet34"), ("head", "classifier"), ("build_kwargs", {"foo": 1}), ("classes", ["a", "b"]),
    ("classes", "abc"), ("classes", ["a", "a", "b"]), ("format", 99),
])
def test_a_hand_edited_model_json_is_refused_with_a_sentence(run, field, value):
    card = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps(dict(card, **{field: value})))
    proc = run_cli("predict", run, "x.png")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "model.json" in proc.stderr


def test_the_predictor_takes_a_path_arrays_and_tensors_alike_and_refuses_what_it_cannot_read(run, tmp_path):
    import numpy as np
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    p = Predictor.from_run(run, device="cpu")
    expected = p.predict([Image.fromarray(rgb)], topk=3)
    assert p.predict(str(tmp_path / "x.png"), topk=3) == expected  # one path alone: one image
    assert p.predict([rgb], topk=3) == expected  # (H, W, C) array
    assert p.predict([torch.from_numpy(rgb).permute(2, 0, 1)], topk=3) == expected
    assert p.predict([torch.from_numpy(rgb).permute(2, 0, 1) / 255.0], topk=3)[0][0][0] == expected[0][0][0]
    # One image passed alone is one image, not its rows or channels; a 4-D array is a batch.
    for alone in (rgb, torch.from_numpy(rgb).permute(2, 0, 1), Image.fromarray(rgb)):
        assert p.predict(alone, topk=3) == expected
    pair = p.predict(np.stack([rgb, rgb]), topk=3)  # batched: the same up to float rounding
    assert len(pair) == 2 and all([c for c, _ in top] == [c for c, _ in expected[0]] and
                                  [q for _, q in top] == pytest.approx([q for _, q in expected[0]], abs=1e-5)
                                  for top in pair)
    gray = rgb[..., 0]
    assert len(p.predict(gray)) == 1 and len(p.predict(np.stack([gray] * 4))) == 4  # (H, W) and (N, H, W)
    # A PIL image stands upright as its EXIF orientation says, as the same file does.
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.fromarray(rgb).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    from_file = p.predict(str(tmp_path / "turned.jpg"), topk=3)
    with Image.open(tmp_path / "turned.jpg") as im:
        assert p.predict(im, topk=3) == from_file
    for bad, message in [(torch.rand(3, 8, 8) * 255, "values in \\[0, 1\\]"), (torch.zeros(4, 8, 8), "1 or 3 channels"),
                         (42, "images\\[0\\] takes a str, a Path, a PIL image, a Tensor or an array, not 42")]:
        with pytest.raises(TransferkitError, match=message):
            p.predict([bad])
    with pytest.raises(TransferkitError, match="cannot predict a int"):  # a generator's items are read as they come
        p.predict(x for x in [42])


def _bomb(path):
    """A small PNG (about 100 KB) that declares 100 Mpx: decoded whole it would take 300 MB as RGB."""
    from PIL import Image

    Image.new("1", (10_000, 10_000)).save(path)
    assert path.stat().st_size < 200_000


def test_a_decompression_bomb_is_skipped_by_the_pixel_limit_without_pils_warning(run, tmp_path, recwarn):
    """100 Mpx is over PIL's 89 Mpx limit, under which PIL only warns and decodes; transferkit refuses it."""
    from PIL import Image

    from transferkit.data.images import UnreadableImage, image_size

    folder = tmp_path / "photos"
    folder.mkdir()
    _bomb(folder / "bomb.png")
    Image.new("RGB", (50, 40), (200, 30, 30)).save(folder / "red.png")
    results, errors = Predictor.from_run(run, device="cpu").predict_paths([folder], topk=2)
    assert [r["file"] for r in results] == [str(folder / "red.png")]
    assert [e[0] for e in errors] == [str(folder / "bomb.png")] and "pixel limit" in errors[0][1]
    with pytest.raises(UnreadableImage, match="pixel limit"):  # training reads headers with image_size
        image_size(folder / "bomb.png")
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    proc = run_cli("predict", run, folder)
    assert proc.returncode == 0 and "red.png" in proc.stdout, proc.stderr
    assert "skipped" in proc.stderr and "bomb.png" in proc.stderr and "pixel limit" in proc.stderr
    assert "DecompressionBomb" not in proc.stderr and "Traceback" not in proc.stderr


def test_predict_paths_holds_one_batch_of_images_whatever_the_folder_size(run, tmp_path, monkeypatch):
    """Images are decoded, stored and predicted a batch at a time; results come out as they are ready."""
    import weakref

    from PIL import Image

    from transferkit.data import preprocess

    for i in range(40):  # 24x24 squares are stored at their own size: the decoded tensor is the stored one
        Image.new("RGB", (24, 24), (i * 6, 100, 50)).save(tmp_path / f"{i:02d}.png")
    live, most = [0], [0]

    def gone() -> None:
        live[0] -= 1

    store = preprocess.Preprocessing.store

    def counted(self, images, side=None):
        out = store(self, images, side)
        live[0] += 1
        most[0] = max(most[0], live[0])
        weakref.finalize(out, gone)
        return out

    monkeypatch.setattr(preprocess.Preprocessing, "store", counted)
    p = Predictor.from_run(run, device="cpu")
    results, errors = p.predict_paths([tmp_path], topk=1, batch_size=8)
    assert len(results) == 40 and not errors
    assert most[0] <= 8 + 1, f"{most[0]} stored images alive at once with batches of 8"
    # The same answers as predicting the images one at a time.
    one = p.predict([tmp_path / "07.png"], topk=1)[0]
    assert results[7]["top"][0]["class"] == one[0][0] and results[7]["top"][0]["prob"] == pytest.approx(one[0][1])


def test_predict_files_takes_one_path_alone_as_a_file_or_a_folder_of_images(run, tmp_path):
    """A str or Path is one path (a folder: its images, found as `transferkit predict` finds them), not a
    sequence of one-character paths."""
    from PIL import Image

    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for name in ("a.png", "more/b.png"):
        Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / name)
    p = Predictor.from_run(run, device="cpu")
    for given in (str(folder), folder):
        answers = list(p.predict_files(given, topk=2))
        assert sorted(path.name for path, _ in answers) == ["a.png", "b.png"], answers
        assert all(len(top) == 2 and top[0][0] in "abc" for _, top in answers)
    one = list(p.predict_files(str(folder / "a.png"), topk=2))
    assert [path for path, _ in one] == [folder / "a.png"] and len(one[0][1]) == 2
    assert list(p.predict_files(str(tmp_path / "nowhere"))) == [(tmp_path / "nowhere", "no such file or folder")]
    results, errors = p.predict_paths(str(folder), topk=2)
    assert len(results) == 2 and not errors


@pytest.mark.parametrize(("args", "message"), [
    (["--topk", "0"], "--topk 0"), (["--batch-size", "0"], "--batch-size 0"),
    (["--batch-size", "-3"], "--batch-size -3"), (["--image-size", "1"], "--image-size 1"),
])
def test_predict_refuses_bad_numbers_with_a_sentence(run, tmp_path, args, message):
    proc = run_cli("predict", run, tmp_path, *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_predict_precision_picks_the_arithmetic(run, tmp_path):
    """--precision fp32 gives the fp32 Predictor's probabilities (what an ONNX export gives); an ONNX file
    itself runs in fp32 only, and says so."""
    from PIL import Image

    Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    proc = run_cli("predict", run, tmp_path / "x.png", "--precision", "fp32", "--json", "--topk", "3")
    assert proc.returncode == 0, proc.stderr
    cli = {t["class"]: t["prob"] for t in json.loads(proc.stdout)["predictions"][0]["top"]}
    p = Predictor.from_run(run, device="cpu", precision="fp32")
    assert p.precision == "fp32"
    for c, q in p.predict(str(tmp_path / "x.png"), topk=3)[0]:
        assert cli[c] == pytest.approx(q, abs=1e-6)
    (tmp_path / "m.onnx").write_bytes(b"")
    proc = run_cli("predict", tmp_path / "m.onnx", tmp_path / "x.png", "--precision", "bf16")
    assert proc.returncode == 2 and "runs in fp32" in proc.stderr and "Traceback" not in proc.stderr


def test_predict_shows_a_progress_bar_on_a_terminal_only(run, tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios
    import threading

    from PIL import Image

    for i in range(12):
        Image.new("RGB", (50, 40), (i * 20, 3, 3)).save(tmp_path / f"{i:02d}.png")
    args = [sys.executable, "-m", "transferkit", "predict", str(run), str(tmp_path), "--batch-size", "4"]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    seen: list[bytes] = []

    def read() -> None:
        try:
            while chunk := os.read(master, 65536):
                seen.append(chunk)
        except OSError:  # the terminal closed
            pass

    reader = threading.Thread(target=read)
    reader.start()
    proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=slave, text=True, timeout=300)
    os.close(slave)
    reader.join(10)
    os.close(master)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 12
    assert b"12/12" in b"".join(seen)
    piped = run_cli("predict", run, tmp_path, "--batch-size", "4")
    assert piped.returncode == 0 and "12/12" not in piped.stderr and "img/s" not in piped.stderr
