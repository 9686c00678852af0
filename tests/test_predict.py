"""Pretrained weights with their own preprocessing on real photos; checkpoints round-trip exactly."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import needs_weights
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
