"""--strategy auto (the default): a linear probe on cached features for small training splits, a full fine-tune
for large ones, chosen from the data and said in the log."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import cifar_folder, needs_cifar, needs_weights, run_cli
from transferkit import TrainConfig
from transferkit.config import AUTO_FINETUNE_FROM
from transferkit.training.plan import choose_strategy


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two classes of real photos (cats and dogs of the shared CIFAR-10), 30 a class to train, 10 to test."""
    return cifar_folder(tmp_path_factory, "catdog", 30, 10, ["cat", "dog"])


def test_the_default_strategy_is_auto_and_it_picks_by_the_number_of_training_images():
    cfg = TrainConfig.create()
    assert cfg.strategy == "auto"
    small, why = choose_strategy(cfg, train_images=AUTO_FINETUNE_FROM - 1)
    large, _ = choose_strategy(cfg, train_images=AUTO_FINETUNE_FROM)
    assert (small, large) == ("linear", "finetune")
    assert f"{AUTO_FINETUNE_FROM - 1:,} training images, fewer than {AUTO_FINETUNE_FROM:,}" in why


@pytest.mark.parametrize("settings, flag", [
    (dict(mixup=0.2), "--mixup"), (dict(augment_policy="trivialaugment"), "--augment-policy"),
    (dict(layer_decay=0.8), "--layer-decay"), (dict(trainable_blocks=2), "--trainable-blocks"),
    (dict(progressive=64, image_size=128), "--progressive"), (dict(weights="none"), "random weights"),
])
def test_settings_that_train_the_backbone_make_auto_fine_tune_even_on_few_images(settings, flag):
    strategy, why = choose_strategy(TrainConfig.create(**settings), train_images=40)
    assert strategy == "finetune" and flag in why


def test_an_explicit_strategy_is_kept_whatever_the_data():
    assert choose_strategy(TrainConfig.create(strategy="finetune"), 40)[0] == "finetune"
    assert choose_strategy(TrainConfig.create(strategy="linear"), 10**6)[0] == "linear"


@needs_cifar
@needs_weights
def test_the_default_command_on_a_few_real_photos_probes_cached_features_and_says_why(photos, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--data", photos, "--image-size", "64", "--epochs", "2", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    said = proc.stdout + proc.stderr
    assert "strategy linear (auto): 54 training images, fewer than" in said  # 60 less the 10% held out
    assert "--strategy finetune to train the whole network" in said
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["strategy"] == "linear" and saved["requested"]["strategy"] == "auto"
    card = json.loads((out / "model.json").read_text())
    assert card["strategy"] == "linear"
    assert "- strategy: linear (chosen by --strategy auto: 54 training images" in (out / "report.md").read_text()

    # only the head trained: the backbone's weights are ImageNet's, bit for bit
    from transferkit import Predictor

    pretrained = Predictor.from_pretrained("mobilenet_v2").model.state_dict()
    trained = load_file(out / "model.safetensors")
    backbone = [k for k in trained if k.startswith("features.")]
    assert backbone and all(torch.equal(trained[k], pretrained[k]) for k in backbone)

    # a resumed auto run goes on with what it chose
    again = run_cli("train", "--resume", out, "--epochs", "3")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "strategy linear (auto)" not in again.stdout + again.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["strategy"] == "linear"


@needs_cifar
@needs_weights
def test_asking_for_a_fine_tune_on_the_same_photos_trains_the_backbone(photos, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--data", photos, "--image-size", "64", "--epochs", "1", "--strategy", "finetune",
                   "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(auto)" not in proc.stdout + proc.stderr
    from transferkit import Predictor

    pretrained = Predictor.from_pretrained("mobilenet_v2").model.state_dict()
    trained = load_file(out / "model.safetensors")
    assert any(not torch.equal(trained[k], pretrained[k]) for k in trained if k.startswith("features."))
