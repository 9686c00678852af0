"""Training recipes (issue 17): augmentation policies, random erasing, mixup/cutmix, EMA, layer decay, progressive
resizing. Each draws from the run's generators, so it reproduces exactly, and a killed run resumes bit-identically."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file
from skimage import data as photos
from torchvision.transforms.v2 import functional as TF

from conftest import SHARED_CIFAR, link_subset
from test_faults import kill_and_resume, outcome, same, start
from transferkit import TrainConfig, TransferkitError, train
from transferkit.data.mixing import Mixing
from transferkit.data.policies import OPS, apply_ops
from transferkit.data.preprocess import Preprocessing
from transferkit.data.transforms import TrainTransform
from transferkit.training.averaging import WeightAverage
from transferkit.training.engine import StepSetup, train_step
from transferkit.training.plan import param_groups as _param_groups
from transferkit.training.plan import progressive_size

SIZE = 64
PRE = Preprocessing(image_size=SIZE, resize_size=SIZE)
LOW = [(0 - m) / s for m, s in zip(PRE.mean, PRE.std)]  # a normalized black pixel, per channel
HIGH = [(1 - m) / s for m, s in zip(PRE.mean, PRE.std)]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Eight real photos (scikit-image's), uint8 (8, 3, 64, 64)."""
    pics = [photos.astronaut(), photos.chelsea(), photos.coffee(), photos.rocket()]
    x = torch.stack([TF.resize(torch.from_numpy(p).permute(2, 0, 1), [SIZE, SIZE], antialias=True) for p in pics])
    return torch.cat([x, x.flip(-1)])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def in_range(x: torch.Tensor) -> bool:
    lo, hi = torch.tensor(LOW).view(1, 3, 1, 1), torch.tensor(HIGH).view(1, 3, 1, 1)
    return bool(((x >= lo - 1e-5) & (x <= hi + 1e-5)).all())


# ---- augmentation: shapes, ranges, reproducible from the generator, independent of how a batch is split ----------

@pytest.mark.parametrize("settings", [dict(policy="trivialaugment"), dict(policy="randaugment"),
                                      dict(erasing=1.0), dict(policy="trivialaugment", erasing=0.5, augment=False)])
def test_each_augmentation_keeps_shape_and_range_and_replays_exactly_from_the_generator(images, settings):
    tf = TrainTransform(PRE, **settings)
    g = gen(3)
    state = g.get_state()
    before = torch.get_rng_state()
    a = tf(images.clone(), g)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is neither read nor moved
    assert a.shape == (8, 3, SIZE, SIZE) and a.dtype == torch.float32 and torch.isfinite(a).all() and in_range(a)
    g.set_state(state)
    assert torch.equal(tf(images.clone(), g), a)  # the saved generator state replays the batch exactly
    plain = TrainTransform(PRE, augment=settings.get("augment", True))(images.clone(), gen(3))
    assert not torch.equal(a, plain)  # it does something
    # two passes (or two processes) of 3 and 5 rows give the rows of the whole batch
    g.set_state(state)
    first = tf(images[:3].clone(), g, part=(slice(0, 3), 8))
    g.set_state(state)
    rest = tf(images[3:].clone(), g, part=(slice(3, 8), 8))
    torch.testing.assert_close(torch.cat([first, rest]), a, atol=1e-5, rtol=0)


def test_trivialaugment_gives_images_different_ops(images):
    tf = TrainTransform(PRE, augment=False, policy="trivialaugment")
    base = TrainTransform(PRE, augment=False)(images.clone())
    out = tf(images.clone(), gen(0))
    changed = [(out[i] - base[i]).abs().amax().item() for i in range(8)]
    assert len({round(c, 3) for c in changed}) > 3  # not one op for the whole batch


@pytest.mark.parametrize("name, reference", [
    ("brightness", lambda x, m: TF.adjust_brightness(x, 1 + m)),
    ("color", lambda x, m: TF.adjust_saturation(x, 1 + m)),
    ("contrast", lambda x, m: TF.adjust_contrast(x, 1 + m)),
    ("sharpness", lambda x, m: TF.adjust_sharpness(x, 1 + m)),
    ("posterize", lambda x, m: TF.posterize(x, int(m))),
    ("solarize", lambda x, m: TF.solarize(x, m)),
    ("autocontrast", lambda x, m: TF.autocontrast(x)),
    ("equalize", lambda x, m: TF.equalize(x)),
])
def test_the_batched_colour_ops_match_torchvision(images, name, reference):
    x = images.float() / 255
    m = 4.0 if name == "posterize" else 0.6 if name == "solarize" else 0.45
    ours = apply_ops(x.clone(), torch.full((8,), OPS.index(name)), torch.full((8,), m))
    if name in ("posterize", "equalize"):  # torchvision's are defined on uint8
        theirs = torch.stack([reference(im, m) for im in images]).float() / 255
    else:
        theirs = torch.stack([reference(im, m) for im in x])
    torch.testing.assert_close(ours, theirs, atol=2 / 255, rtol=0)


def test_geometric_ops_move_the_picture_and_identity_leaves_it(images):
    x = images.float() / 255
    assert torch.equal(apply_ops(x.clone(), torch.zeros(8, dtype=torch.long), torch.zeros(8)), x)
    turned = apply_ops(x.clone(), torch.full((8,), OPS.index("rotate")), torch.full((8,), 90.0))
    assert min((turned - x.rot90(k, (2, 3))).abs().amax() for k in (1, -1)) < 1e-4
    moved = apply_ops(x.clone(), torch.full((8,), OPS.index("translate_x")), torch.full((8,), 0.25))
    assert (moved[..., -16:] == 0).all() and torch.allclose(moved[..., :-16], x[..., 16:], atol=1e-5)


def test_random_erasing_blanks_one_rectangle_of_2_to_33_percent(images):
    x = TrainTransform(PRE, augment=False, erasing=1.0)(images.clone(), gen(1))
    plain = TrainTransform(PRE, augment=False)(images.clone())
    for i in range(8):
        erased = (x[i] != plain[i]).any(0)
        ys, xs = erased.nonzero(as_tuple=True)
        assert (x[i][:, erased] == 0).all()
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert 0.02 * SIZE**2 * 0.8 <= box <= SIZE**2 / 3 * 1.2 and erased.sum() >= 0.9 * box
    assert torch.equal(TrainTransform(PRE, augment=False, erasing=0.0)(images.clone(), gen(1)), plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_every_option_runs_on_the_device_and_replays_from_its_generator(images):
    dev = torch.device("cuda")
    tf = TrainTransform(PRE, policy="randaugment", erasing=0.5, channels_last=True)
    g = torch.Generator(device=dev).manual_seed(0)
    state = g.get_state()
    mix = Mixing(mixup=0.2, cutmix=1.0).draw(8, g)
    a = tf(images.to(dev), g)
    mixed, _ = mix.apply(a, tf(images[mix.partner].to(dev), g))
    g.set_state(state)
    mix2 = Mixing(mixup=0.2, cutmix=1.0).draw(8, g)
    assert a.is_cuda and mixed.is_cuda and torch.equal(tf(images.to(dev), g), a) and mix2.lam == mix.lam
    assert in_range(a.cpu())


# ---- mixup / cutmix --------------------------------------------------------------------------------------------

class Tiny(torch.nn.Module):
    """A convolution, pooling and a linear head: no BatchNorm, so passes of any size compute the same thing."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def step(mixing, micro=None, smoothing=0.1, generator=None, images=None, labels=None):
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    setup = StepSetup(TrainTransform(PRE, policy="trivialaugment"), torch.device("cpu"), "fp32", micro, smoothing,
                      mixing=mixing)
    figs = train_step(model, opt, sched, images, labels, setup, generator)
    return model, figs


def test_mixup_and_cutmix_draw_from_the_generator_and_mix_labels_by_the_same_share(images):
    labels = torch.arange(8) % 4
    for mixing in (Mixing(mixup=0.4), Mixing(cutmix=1.0)):
        g = gen(5)
        mix = mixing.draw(8, g)
        assert torch.equal(mix.partner, mixing.draw(8, gen(5)).partner) and mix.lam == mixing.draw(8, gen(5)).lam
        assert sorted(mix.partner.tolist()) == list(range(8)) and 0 <= mix.lam <= 1
        x = TrainTransform(PRE, augment=False)(images)
        mixed, lam = mix.apply(x, x[mix.partner])
        if mixing.cutmix:  # the share of the own label is the share of the own pixels
            own = (mixed == x).all(1).float().mean((1, 2))
            moved = (x != x[mix.partner]).any(1).float().mean((1, 2)) > 0
            torch.testing.assert_close(own[moved & (labels != labels[mix.partner])].min(), torch.tensor(lam),
                                       atol=0.02, rtol=0)
        else:
            torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[mix.partner])


def test_the_mixed_loss_is_cross_entropy_with_soft_smoothed_targets_and_passes_do_not_change_the_step(images):
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    g = gen(9)
    state = g.get_state()
    mix = Mixing(mixup=0.4).draw(8, g)
    x_own = TrainTransform(PRE, policy="trivialaugment")(images.clone(), g)
    model = Tiny()
    with torch.no_grad():
        logits = model(mix.lam * x_own + (1 - mix.lam) * x_own[mix.partner])
    soft = mix.lam * F.one_hot(labels, 4).float() + (1 - mix.lam) * F.one_hot(labels[mix.partner], 4).float()
    expected = F.cross_entropy(logits, soft, label_smoothing=0.1)
    g.set_state(state)
    trained, figs = step(Mixing(mixup=0.4), images=images, labels=labels, generator=g)
    torch.testing.assert_close(figs.loss.float() / 8, expected, atol=1e-5, rtol=0)
    dominant = labels if mix.lam >= 0.5 else labels[mix.partner]
    assert int(figs.correct) == int((logits.argmax(1) == dominant).sum())
    g.set_state(state)
    in_passes, figs2 = step(Mixing(mixup=0.4), micro=3, images=images, labels=labels, generator=g)
    torch.testing.assert_close(figs2.loss, figs.loss, atol=1e-6, rtol=0)
    for a, b in zip(trained.parameters(), in_passes.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---- EMA -------------------------------------------------------------------------------------------------------

def test_the_weight_average_follows_trainable_weights_and_batchnorm_statistics():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.rand(2, 3, 8, 8))
    model[0].requires_grad_(False)  # a frozen layer stays as it is
    ema = WeightAverage(model, 0.9)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(2.0)
        model[1].num_batches_tracked.add_(1)
    ema.update(model)
    d = min(0.9, 2 / 11)  # the first update, warmed up
    now = ema.module.state_dict()
    torch.testing.assert_close(now["3.weight"], d * start["3.weight"] + (1 - d) * model[3].weight)
    torch.testing.assert_close(now["1.running_mean"], start["1.running_mean"] + (1 - d) * 2.0)
    assert torch.equal(now["0.weight"], start["0.weight"])
    assert torch.equal(now["1.num_batches_tracked"], model[1].num_batches_tracked)


# ---- layer decay -----------------------------------------------------------------------------------------------

def test_layer_decay_gives_each_block_decay_times_the_lr_of_the_block_above():
    model = torchvision.models.resnet18(num_classes=3)
    cfg = TrainConfig(lr=1.0, backbone_lr_mult=0.5, layer_decay=0.8, weight_decay=0.05)
    groups = _param_groups(cfg, model, "fc")
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    # the blocks of --trainable-blocks, from the head down: layer4.1, layer4.0, ..., layer1.0, bn1, conv1
    blocks = ["layer4.1", "layer4.0", "layer3.1", "layer3.0", "layer2.1", "layer2.0", "layer1.1", "layer1.0",
              "bn1", "conv1"]
    for name, p in model.named_parameters():
        k = next((i for i, b in enumerate(blocks) if name.startswith(b + ".")), None)
        want = 1.0 if name.startswith("fc.") else 0.5 * 0.8**k
        assert lr_of[id(p)] == pytest.approx(want), name
    assert groups[0]["name"] == "head" and all(g["weight_decay"] == 0 for g in groups if "no_decay" in g["name"])
    assert {g["lr"] for g in _param_groups(TrainConfig(lr=1.0, backbone_lr_mult=0.5), model, "fc")} == {1.0, 0.5}


# ---- settings --------------------------------------------------------------------------------------------------

def test_progressive_sizes_grow_in_steps_of_32_to_the_image_size():
    assert [progressive_size(e, 5, 64, 224) for e in range(1, 6)] == [64, 96, 128, 192, 224]
    assert [progressive_size(e, 2, 96, 160) for e in (1, 2)] == [96, 160]
    assert progressive_size(3, 3, None, 224) == 224


@pytest.mark.parametrize("settings, words", [
    (dict(augment_policy="trivial"), "did you mean 'trivialaugment'"),
    (dict(random_erasing=1.5), "random_erasing is a probability"),
    (dict(mixup=-1), "mixup is the alpha"),
    (dict(ema=1.0), "ema is a decay per step in (0, 1)"),
    (dict(layer_decay=0), "layer_decay must be in (0, 1]"),
    (dict(layer_decay=0.7, strategy="linear"), "--strategy linear trains the head alone"),
    (dict(progressive=128, image_size=64), "must be smaller than image_size"),
])
def test_bad_recipe_settings_are_refused_with_a_sentence(settings, words):
    with pytest.raises(TransferkitError, match=words.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig.create(**settings)


# ---- runs: cached features refuse image augmentation; SIGKILL + resume is bit-identical -------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not (SHARED_CIFAR / "train").is_dir():
        pytest.skip(f"shared CIFAR-10 folder not found at {SHARED_CIFAR}")
    root = tmp_path_factory.mktemp("tiny")
    link_subset(SHARED_CIFAR / "train", root / "train", 10, ["airplane", "cat", "ship"])
    link_subset(SHARED_CIFAR / "test", root / "test", 4, ["airplane", "cat", "ship"])
    return root


def test_image_augmentation_on_cached_features_is_refused_before_any_features_are_computed(tiny, tmp_path):
    with pytest.raises(TransferkitError, match="--mixup, --progressive change.*--no-feature-cache"):
        train(TrainConfig.create(data=str(tiny), model="resnet18", weights="none", image_size=32, strategy="linear",
                                 mixup=0.2, progressive=16, out=str(tmp_path / "run"), workers=1))
    assert not (tmp_path / "run").exists()


def test_with_ema_the_saved_model_is_the_average_not_the_last_weights(tiny, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig.create(data=str(tiny), model="mobilenet_v3_small", weights="none", image_size=32, epochs=1,
                             batch_size=6, val_split=0.2, ema=0.9, out=str(run), workers=1))
    saved, model = torch.load(run / "last.pt", weights_only=True), load_file(run / "model.safetensors")
    assert saved["ema"]["updates"] == 4  # one a step: 24 training images in batches of 6
    assert all(torch.equal(model[k], saved["ema"]["model"][k]) for k in model)  # the one epoch is the best
    assert any(not torch.equal(model[k], saved["model"][k]) for k in model if k.endswith("weight"))
    assert "validating and saving the weights' moving average (--ema 0.9)" in (run / "train.log").read_text()


RECIPE = dict(model="mobilenet_v3_small", weights="none", image_size=32, epochs=2, batch_size=6, micro_batch=3,
              val_split=0.2, workers=1, augment_policy="trivialaugment", mixup=0.2, cutmix=1.0, random_erasing=0.3,
              ema=0.999, layer_decay=0.8, checkpoint_every=2)  # 24 training images: 4 steps an epoch


def test_sigkill_then_resume_with_policy_mixing_and_ema_is_bit_identical(tiny, tmp_path, caplog):
    straight = tmp_path / "straight"
    train(TrainConfig.create(data=str(tiny), out=str(straight), **RECIPE))
    assert "train_acc counts an answer right when it is the label with the larger share" in caplog.text
    args = [f"--{k.replace('_', '-')}={v}" for k, v in RECIPE.items()]
    run = tmp_path / "killed"
    # at step 2 of epoch 1, then (resumed) after epoch 1 and at step 2 of epoch 2
    assert kill_and_resume(start("train", "--data", tiny, *args, "--out", run), run, (1, 2)) == 2
    same(outcome(straight), outcome(run))


def test_two_processes_train_what_one_process_trains_with_every_recipe_option(tiny, tmp_path):
    from test_distributed import assert_same_training, torchrun

    # no dropout, frozen BatchNorm statistics and fp32: nothing else depends on how a batch is split (as in
    # test_distributed); every recipe option does not either
    settings = {**RECIPE, "model": "resnet18", "epochs": 1, "batch_size": 8, "micro_batch": 0, "checkpoint_every": 0,
                "batchnorm": "frozen", "precision": "fp32", "ema": 0.5}
    args = ["train", "--data", tiny, *[f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]]
    train(TrainConfig.create(data=str(tiny), out=str(tmp_path / "one"), **settings))
    two = torchrun(*args, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stdout + two.stderr
    assert_same_training(tmp_path / "one", tmp_path / "two")
