"""lr-find and --lr auto: a suggestion inside the range a sweep finds good, nothing leaks into training,
config.yaml records what was asked for and what trained, bad input is one sentence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from conftest import cifar_folder, needs_weights, run_cli
from transferkit import cli, models
from transferkit.data.sources import Split
from transferkit.data.transforms import batches
from transferkit.errors import TransferkitError
from transferkit.training import engine, lr_find
from transferkit.training.features import identity
from transferkit.training.state import new_state

CPU = torch.device("cpu")
PROBE = ["--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--strategy", "linear", "--image-size", "32",
         "--batch-size", "32"]
SETUP = engine.StepSetup(identity, CPU, "fp32", None, 0.1)  # as train sets up a linear probe on cached features


class Head(nn.Module):
    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.fixture
def one_thread():
    """Tensors this small train fastest on one thread (two threads on a busy 2-core machine: 30x slower)."""
    kept = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(kept)


def _features(seed: int = 0, classes: int = 10, dim: int = 64, per_class: int = 200) -> tuple[Split, Split]:
    """Overlapping Gaussian clusters: a probe that needs the right lr to get far in 3 epochs."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g) * 0.6

    def draw(n: int, name: str) -> Split:
        y = torch.arange(classes).repeat_interleave(n)
        return Split(name, means[y] + 2 * torch.randn(len(y), dim, generator=g), y)

    return draw(per_class, "train"), draw(100, "val")


def _val_loss_after_training(train: Split, val: Split, lr: float, epochs: int = 3, batch: int = 64) -> float:
    """What a run at this lr reaches: train's optimizer, warmup and cosine schedule, the val loss at the end."""
    torch.manual_seed(0)
    head = Head(train.images.shape[1], 10)
    steps = -(-len(train) // batch)
    state = new_state(head, models.param_groups(head, "fc", lr, 1.0, 0.05), optimizer="adamw", lr=lr, momentum=0.9,
                      schedule="cosine", steps=steps * epochs, warmup_steps=round(0.2 * steps), seed=0, device=CPU)
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=state.shuffle)
        for _ in engine.train_one_epoch(head, state.optimizer, state.scheduler, batches(train, batch, order=order),
                                        SETUP, state.augment):
            pass
    with torch.no_grad():
        return nn.functional.cross_entropy(head(val.images), val.labels).item()


def _range_test(head: nn.Module, train: Split, seed: int = 0, **kw) -> lr_find.RangeTest:
    """The range test for the runs of _val_loss_after_training: batch 64, 3 epochs of cosine after warmup."""
    steps = -(-len(train) // 64)
    mean = lr_find.schedule_mean("cosine", 3 * steps, round(0.2 * steps))
    return lr_find.range_test(head, head, models.param_groups(head, "fc", 1.0, 1.0, 0.05), train, SETUP,
                              optimizer="adamw", momentum=0.9, batch_size=64, seed=seed, schedule_mean=mean, **kw)


def test_the_suggestion_falls_in_the_range_a_sweep_finds_good(one_thread):
    train, val = _features()
    sweep = np.logspace(-3, 0, 13)  # quarter decades
    losses = np.array([_val_loss_after_training(train, val, lr) for lr in sweep])
    good = sweep[losses <= 1.1 * losses.min()]  # within 10% of the best validation loss
    assert 1e-3 < good.min() and good.max() < 1  # the range is a real part of the sweep
    for seed in (0, 1):
        torch.manual_seed(seed)
        found = _range_test(Head(64, 10), train, seed=seed)
        assert good.min() <= found.suggestion <= good.max(), (found.suggestion, good)
        assert 0.5 <= found.suggestion / sweep[losses.argmin()] <= 2  # within a factor of 2 of the sweep's best
        assert len(found.lrs) == len(found.losses) == len(found.smoothed) <= 100


def test_range_test_restores_weights_batchnorm_statistics_and_the_global_generator(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Dropout(0.2), nn.Linear(8, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    images = torch.randint(0, 256, (96, 3, 16, 16), dtype=torch.uint8)
    split = Split("train", images, torch.arange(96) % 3)
    rng = torch.get_rng_state()
    setup = engine.StepSetup(lambda x, g=None, part=None: x.float() / 255, CPU, "fp32", None, 0.0)
    found = lr_find.range_test(model, model, models.param_groups(model, "6", 1.0, 0.1, 0.05), split, setup,
                               optimizer="sgd", momentum=0.9, batch_size=32, seed=0, steps=20)
    assert len(found.lrs) > 5
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the range test changed the model"
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_diverging_ramp_stops_early(one_thread):
    train, _ = _features(per_class=100)
    torch.manual_seed(0)
    found = _range_test(Head(64, 10), train, start_lr=1e-3, end_lr=1e4, steps=100)
    assert found.stopped in ("diverged", "non-finite loss") and len(found.lrs) < 100


def test_steps_below_ten_are_refused_in_a_sentence():
    with pytest.raises(TransferkitError, match="at least 10 steps"):
        lr_find.check_ramp(0, 1e-7, 1.0)


@needs_weights
def test_lr_find_cli_on_cached_features_writes_the_curve_and_plot(cifar_small, tmp_path, capsys):
    out = tmp_path / "lrf"
    proc = run_cli("lr-find", "--data", cifar_small, *PROBE, "--out", out)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((out / "lr_find.json").read_text())
    assert f"suggested lr {saved['suggestion']:.2e}" in proc.stdout
    assert 1e-7 <= saved["suggestion"] <= 1 and len(saved["lrs"]) == len(saved["losses"]) > 10
    assert saved["notes"]["strategy"] == "linear"
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_weights
def test_train_lr_auto_records_the_resolved_and_the_requested_lr(cifar_small, tmp_path, capsys):
    out = tmp_path / "run"
    proc = run_cli("train", "--data", cifar_small, *PROBE, "--epochs", "1", "--lr", "auto", "--out", out)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load((out / "config.yaml").read_text())
    suggestion = json.loads((out / "lr_find.json").read_text())["suggestion"]
    assert config["lr"] == pytest.approx(suggestion) and config["requested"]["lr"] == "auto"
    assert f"--lr auto: lr {suggestion:.3g}" in proc.stderr
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr_start"] <= suggestion  # the run trained at the suggestion (warmup rises to it)
    # A resume continues at the resolved lr: no second range test, the same config.yaml
    proc = run_cli("train", "--resume", out, "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    assert "--lr auto" not in proc.stderr and "lr-find" not in proc.stderr
    resumed = yaml.safe_load((out / "config.yaml").read_text())
    assert resumed == dict(config, epochs=2)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@needs_weights
def test_lr_find_help_lists_what_changes_the_range_test_and_still_takes_a_train_commands_flags(cifar_small,
                                                                                                 tmp_path):
    shown = run_cli("lr-find", "--help").stdout
    assert "--steps" in shown and "--augment-policy" in shown and "--layer-decay" in shown
    assert "NCCL" not in shown and "--tta" not in shown and "--patience" not in shown and "--ema" not in shown
    proc = run_cli("lr-find", "--data", cifar_small, *PROBE, "--tta", "--patience", "2", "--out", tmp_path / "lrf")
    assert proc.returncode == 0 and "suggested lr" in proc.stdout, proc.stderr


def test_bad_input_exits_2_with_a_sentence(tmp_path, capsys):
    proc = run_cli("lr-find", "--data", tmp_path / "missing", "--strategy", "linear")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "missing" in proc.stderr, proc.stderr
    proc = run_cli("lr-find", "--data", tmp_path, "--steps", "0")
    assert proc.returncode == 2 and "at least 10 steps" in proc.stderr, proc.stderr
    with pytest.raises(SystemExit) as stop:  # argparse's own exit
        cli.main(["train", "--data", str(tmp_path), "--lr", "fast"])
    assert stop.value.code == 2 and "a number or auto" in capsys.readouterr().err


def test_a_loss_that_never_falls_gives_no_suggestion_rather_than_an_lr_below_the_ramp():
    from transferkit.training import lr_find

    lrs = list(np.geomspace(1e-7, 1.0, 20))
    rising = [0.7 + 0.01 * i for i in range(20)]  # random weights over a short ramp: the loss only grows
    with pytest.raises(lr_find.NoDescent, match="did not fall.*--steps or pass --lr"):
        lr_find.suggest(lrs, rising)
    falling = [2.0 - 0.05 * i for i in range(15)] + [1.3 + 0.2 * i for i in range(5)]
    assert lrs[1] <= lr_find.suggest(lrs, falling) <= lrs[-1]


@pytest.mark.parametrize("size", [32, 48])
def test_lr_find_takes_every_image_size_train_takes_for_a_fixed_size_timm_model(tmp_path_factory, size):
    """A ViT's position embeddings fix its input side: train builds it at --image-size, and lr-find, which
    builds the model with train's own code, must too (it used to build it at the weights' 224 px and refuse)."""
    data = cifar_folder(tmp_path_factory, "vit", 8, 2, ["airplane", "cat"])
    flags = ["--data", data, "--model", "timm/test_vit", "--weights", "none", "--image-size", str(size),
             "--batch-size", "8", "--precision", "fp32", "--workers", "1"]
    out = tmp_path_factory.mktemp("runs")
    trained = run_cli("train", *flags, "--epochs", "1", "--val-split", "0", "--out", out / "train")
    assert trained.returncode == 0, trained.stderr
    found = run_cli("lr-find", *flags, "--steps", "10", "--out", out / "lrf")
    assert found.returncode == 0, found.stderr
    assert json.loads((out / "lrf" / "lr_find.json").read_text())["notes"]["image_size"] == size


# issue 27, item 20 ---------------------------------------------------------------------------------------------------

def test_lr_find_png_says_how_many_steps_and_images_the_ramp_trained_on(one_thread, tmp_path, monkeypatch):
    """54 images in batches of 64: every step is all 54 images, and the picture says so (it said '91 steps of
    batch 64'); a split of 2,000 images is a few passes, without a caution."""
    titles = {}
    save = lr_find.save_png

    def keep(fig, path, *a, **kw):
        titles[path.name] = fig.axes[0].get_title()
        save(fig, path, *a, **kw)

    monkeypatch.setattr(lr_find, "save_png", keep)
    train, _ = _features()
    torch.manual_seed(0)
    small = Split("train", train.images[::37][:54], train.labels[::37][:54])
    found = _range_test(Head(64, 10), small)
    lr_find.write(tmp_path, found, "probe on 54 images")
    shown = titles["lr_find.png"].replace("\n", " ")
    assert f"{len(found.lrs)} steps, each on all 54 training images (fewer than batch 64)" in shown, shown
    assert "steps of batch 64," not in shown
    assert json.loads((tmp_path / "lr_find.json").read_text())["images"] == 54
    big = _range_test(Head(64, 10), train)
    assert big.caution == ""
    lr_find.write(tmp_path, big, "probe on 2,000 images")
    assert f"{len(big.lrs)} steps of batch 64 from 2,000 training images" in titles["lr_find.png"].replace("\n", " ")


@needs_weights
def test_lr_auto_on_a_handful_of_images_trains_at_its_suggestion_with_a_caution(tmp_path_factory):
    data = cifar_folder(tmp_path_factory, "handful", 18, 4, ["airplane", "cat", "ship"])
    out = tmp_path_factory.mktemp("runs") / "auto"
    proc = run_cli("train", "--data", data, *PROBE, "--epochs", "1", "--lr", "auto", "--val-split", "0",
                   "--out", out)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((out / "lr_find.json").read_text())
    assert saved["images"] == 54 and "54 training images" in saved["caution"]
    assert "treat the suggestion as rough" in proc.stderr
    setup = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("- optimizer"))
    assert "--lr auto" in setup and "caution: treat the suggestion as rough" in setup
