"""Settings: recipes, precedence, validation with did-you-mean, YAML round trip."""

from __future__ import annotations

import pytest

from transferkit import TrainConfig
from transferkit.errors import TransferkitError


def test_seed_recipe_is_the_classic_tutorial():
    c = TrainConfig.create(recipe="seed", data="cifar10", model="resnet18")
    assert (c.image_size, c.batch_size, c.epochs, c.optimizer, c.lr, c.momentum) == (224, 64, 10, "sgd", 0.001, 0.9)
    assert c.mean == (0.0, 0.0, 0.0) and c.std == (1.0, 1.0, 1.0)  # ToTensor only, no Normalize
    assert not c.augment and c.label_smoothing == 0 and c.weight_decay == 0 and c.schedule == "constant"
    assert c.strategy == "finetune" and c.backbone_lr_mult == 1.0 and c.log_every == 100
    assert c.precision == "fp32"


def test_explicit_settings_win_over_the_recipe():
    c = TrainConfig.create(recipe="seed", epochs=2, lr=0.01)
    assert c.epochs == 2 and c.lr == 0.01 and c.optimizer == "sgd"


def test_fast_recipe_freezes_mobilenet_v2s_first_blocks_and_trains_other_models_whole(tmp_path):
    mnv2 = TrainConfig.create(recipe="fast")
    assert (mnv2.model, mnv2.image_size, mnv2.trainable_blocks, mnv2.feature_cache) == ("mobilenet_v2", 160, 12, False)
    other = TrainConfig.create(recipe="fast", model="resnet18")  # MobileNetV2's block count means nothing here
    assert (other.image_size, other.trainable_blocks, other.feature_cache) == (112, None, True)
    assert TrainConfig.create(recipe="fast", image_size=128).image_size == 128  # a flag still wins
    for changed in (dict(strategy="linear"), dict(weights="none")):  # the head alone; random blocks frozen: neither
        assert TrainConfig.create(recipe="fast", **changed).trainable_blocks is None
    # a run's config.yaml from before the recipe changed resumes with what it trained with
    before = TrainConfig.create(recipe="fast").replace(image_size=112, trainable_blocks=None, feature_cache=True)
    (tmp_path / "config.yaml").write_text(before.to_yaml())
    assert TrainConfig.from_yaml(tmp_path / "config.yaml") == before
    (tmp_path / "mine.yaml").write_text("recipe: fast\nepochs:\nimage_size:\n")  # other blanks: the recipe's
    mine = TrainConfig.from_yaml(tmp_path / "mine.yaml")
    assert (mine.epochs, mine.image_size, mine.trainable_blocks) == (3, 160, 12)


def test_misspelled_setting_and_choice_get_did_you_mean():
    with pytest.raises(TransferkitError, match="did you mean 'backbone_lr_mult'"):
        TrainConfig.create(backbone_lr_mul=0.1)
    with pytest.raises(TransferkitError, match="did you mean 'linear'"):
        TrainConfig.create(strategy="linaer")
    with pytest.raises(TransferkitError, match="unknown recipe"):
        TrainConfig.create(recipe="sed")


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"val_split": 1.0}, {"lr": -1}, {"mean": (0.5, 0.5)},
                                 {"std": (1, 0, 1)}, {"image_size": 4}])
def test_invalid_values_are_refused(bad):
    with pytest.raises(TransferkitError):
        TrainConfig.create(**bad)


def test_yaml_round_trip(tmp_path):
    c = TrainConfig.create(recipe="seed", data="some/folder", mean=(0.1, 0.2, 0.3))
    path = tmp_path / "config.yaml"
    path.write_text(c.to_yaml())
    assert TrainConfig.from_yaml(path) == c
    assert TrainConfig.from_yaml(path, epochs=3).epochs == 3


def test_yaml_keeps_what_was_asked_for_beside_the_resolved_values_and_reads_back_the_resolved(tmp_path):
    from transferkit.config import requested_from

    c = TrainConfig.create(data="some/folder", weights="IMAGENET1K_V1", image_size=224, mean=(0.485, 0.456, 0.406),
                           std=(0.229, 0.224, 0.225))
    path = tmp_path / "config.yaml"
    path.write_text(c.to_yaml({"weights": "imagenet", "image_size": None, "mean": None, "std": None}))
    assert TrainConfig.from_yaml(path) == c
    assert requested_from(path) == {"weights": "imagenet", "image_size": None, "mean": None, "std": None}


def test_random_weights_train_the_backbone_at_the_heads_lr_unless_told_otherwise(tmp_path):
    """With --weights none there is nothing pretrained to protect: the backbone is not held at a tenth of the lr."""
    assert TrainConfig.create(weights="none").backbone_lr_mult == 1.0
    assert TrainConfig.create(weights="none", backbone_lr_mult=0.3).backbone_lr_mult == 0.3
    assert TrainConfig.create().backbone_lr_mult == 0.1  # pretrained weights: a smaller lr for the backbone
    path = tmp_path / "config.yaml"
    path.write_text(TrainConfig.create(weights="none").to_yaml())
    assert TrainConfig.from_yaml(path).backbone_lr_mult == 1.0


LAUGHS = """data: some/folder
mean:
  - &a [1, 1, 1, 1, 1, 1, 1, 1, 1]
  - &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
  - &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
  - [*c, *c, *c, *c, *c, *c, *c, *c, *c]
"""


def test_yaml_aliases_are_refused_in_one_short_sentence_and_configs_are_written_without_them(tmp_path):
    """Nine levels of these nested aliases in a 1 KB file made a 2.1 GB message, 9.9 GB of memory and 49 s."""
    from conftest import run_cli
    from transferkit.config import requested_from

    laughs = tmp_path / "laughs.yaml"
    laughs.write_text(LAUGHS)
    proc = run_cli("train", "--config", laughs)
    assert proc.returncode == 2 and len(proc.stderr) < 400, proc.stderr[:1000]
    assert "line 4: an alias (*a)" in proc.stderr and "write the value out in full" in proc.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [\n")  # PyYAML's own message: three lines and a caret
    proc = run_cli("train", "--config", broken)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: cannot read config '{broken}': line 2, column 1: expected the node content, but found '<stream end>'"]
    # what transferkit writes it reads back: one list object under two names is written out twice
    rgb = [0.5, 0.5, 0.5]
    c = TrainConfig.create(data="some/folder", mean=rgb, std=rgb)
    path = tmp_path / "config.yaml"
    path.write_text(c.to_yaml({"mean": rgb, "std": rgb}))
    assert TrainConfig.from_yaml(path) == c and requested_from(path) == {"mean": rgb, "std": rgb}


def test_a_setting_written_twice_in_a_config_is_refused_naming_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys: `epochs: 1` then `epochs: 2` trained 2 epochs without a word."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("data: some/folder\nepochs: 1\nimage_size: 32\nepochs: 2\n")
    with pytest.raises(TransferkitError, match=r"line 4: epochs is set twice \(first on line 2\)"):
        TrainConfig.from_yaml(twice)
    merged = tmp_path / "merged.yaml"  # a merge key is not a key written twice
    merged.write_text("data: some/folder\n<<: {epochs: 2}\nimage_size: 32\n")
    assert TrainConfig.from_yaml(merged).epochs == 2


def test_a_huge_value_is_quoted_in_an_error_in_a_few_dozen_characters():
    for settings, quoted in (({"mean": ["a" * 10**6, 0, 0]}, "'aaaa"), ({"mean": [[1] * 10**5] * 4}, "[[1, 1, "),
                             ({"strategy": "x" * 10**6}, "'xxxx"), ({"y" * 10**6: 1}, "'yyyy"),
                             ({"recipe": "r" * 10**6}, "'rrrr")):
        with pytest.raises(TransferkitError) as e:
            TrainConfig.create(data="some/folder", **settings)
        assert quoted in str(e.value) and len(str(e.value)) < 250, str(e.value)[:300]
    # a message that quotes a value whole anyway keeps its start and its end
    long = TransferkitError("start " + "z" * 10**7 + " end")
    assert len(str(long)) < 4100 and str(long).startswith("start ") and str(long).endswith(" end")
