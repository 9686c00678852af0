"""Backbones: the head is found and replaced for every family; freezing keeps BatchNorm honest."""

from __future__ import annotations

import pytest
import torch

from transferkit.errors import TransferkitError
from transferkit.models import (
    create_backbone,
    param_groups,
    set_trainable,
    train_mode,
)

# (model, expected head path, input size): one per family torchvision has.
FAMILIES = [
    ("resnet18", "fc", 64),
    ("resnext50_32x4d", "fc", 64),
    ("regnet_y_400mf", "fc", 64),
    ("shufflenet_v2_x0_5", "fc", 64),
    ("googlenet", "fc", 64),
    ("inception_v3", "fc", 96),
    ("mobilenet_v2", "classifier.1", 64),
    ("mobilenet_v3_small", "classifier.3", 64),
    ("efficientnet_b0", "classifier.1", 64),
    ("mnasnet0_5", "classifier.1", 64),
    ("convnext_tiny", "classifier.2", 64),
    ("densenet121", "classifier", 64),
    ("squeezenet1_0", "classifier.1", 64),
    ("alexnet", "classifier.6", 64),
    ("vit_b_16", "heads.head", 224),
    ("swin_t", "head", 64),
    ("maxvit_t", "classifier.5", 224),
]


@pytest.mark.parametrize(("arch", "head", "size"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_head_is_replaced_for_each_family(arch, head, size):
    bb = create_backbone(arch, "none")
    assert bb.head == head
    from transferkit.models import replace_head

    replace_head(bb.model, bb.head, 7)
    bb.model.eval()
    with torch.no_grad():
        out = bb.model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    set_trainable(bb.model, bb.head, False)
    trainable = {n for n, p in bb.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(head + ".") for n in trainable)


def _one_step(model, lr=0.1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    train_mode(model)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 64, 64) * 3 + 1), torch.arange(8) % 4)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_frozen_batchnorm_running_stats_do_not_move():
    bb = create_backbone("mobilenet_v2", "none", num_classes=4)
    set_trainable(bb.model, bb.head, False)
    before = {k: v.clone() for k, v in bb.model.state_dict().items() if "running" in k}
    head_before = bb.model.get_submodule(bb.head).weight.clone()
    _one_step(bb.model)
    after = bb.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not torch.equal(head_before, bb.model.get_submodule(bb.head).weight)  # the head did learn

    # Unfrozen (finetune, or gradual after its head epochs), BatchNorm adapts to the new data.
    set_trainable(bb.model, bb.head, True)
    _one_step(bb.model)
    after = bb.model.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in before.items())


def test_param_groups_skip_weight_decay_on_norms_and_biases_and_scale_backbone_lr():
    bb = create_backbone("resnet18", "none", num_classes=3)
    groups = {g["name"]: g for g in param_groups(bb.model, bb.head, 0.01, 0.1, 0.05)}
    assert groups["head"]["lr"] == 0.01 and groups["backbone"]["lr"] == pytest.approx(0.001)
    assert groups["head_no_decay"]["weight_decay"] == 0 and groups["backbone_no_decay"]["weight_decay"] == 0
    assert all(p.ndim == 1 for p in groups["backbone_no_decay"]["params"])
    assert groups["backbone"]["weight_decay"] == 0.05
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(bb.model.parameters()))


def test_unknown_model_suggests_the_closest_name():
    with pytest.raises(TransferkitError, match="unknown model 'resnet5' — did you mean 'resnet50'"):
        create_backbone("resnet5", "none")


def test_unknown_weights_name_lists_the_choices():
    with pytest.raises(TransferkitError, match="IMAGENET1K_V1"):
        create_backbone("resnet18", "IMAGENET1K_V9")


def test_offline_without_weights_names_the_file_and_the_fix(monkeypatch, tmp_path):
    from urllib.error import URLError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*a, **k):
        raise URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(TransferkitError) as e:
        create_backbone("resnet18", "imagenet")
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and "--weights" in msg and str(tmp_path) in msg


def test_weights_from_a_local_file_load_and_a_code_pickle_is_refused(tmp_path):
    src = create_backbone("resnet18", "none")
    good = tmp_path / "r18.pth"
    torch.save(src.model.state_dict(), good)
    bb = create_backbone("resnet18", str(good), num_classes=5)
    assert torch.equal(bb.model.conv1.weight, src.model.conv1.weight)
    assert bb.weights.startswith("file:")

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Evil()}, bad)
    with pytest.raises(TransferkitError, match="never runs pickled code"):
        create_backbone("resnet18", str(bad))
    assert not marker.exists()


def test_weights_of_another_architecture_are_refused_with_the_fix(tmp_path):
    path = tmp_path / "m.pth"
    torch.save(create_backbone("mobilenet_v2", "none").model.state_dict(), path)
    with pytest.raises(TransferkitError, match="architecture these weights"):
        create_backbone("resnet18", str(path))
