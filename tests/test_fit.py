"""Training runs through the Python API: resume, config files, strategies."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import transferkit.training.loop as loop
from conftest import cifar_folder, needs_cifar
from transferkit import TrainConfig, TransferkitError, train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return cifar_folder(tmp_path_factory, "tiny", 12, 6, ["airplane", "cat", "ship"])


def _cfg(tiny, out, **kw):
    base = dict(data=str(tiny), model="resnet18", weights="none", image_size=32, epochs=3, batch_size=8,
                val_split=0.25, out=str(out), strategy="gradual", head_epochs=1, workers=1, backbone_lr_mult=0.1)
    return TrainConfig.create(**{**base, **kw})


@needs_cifar
def test_resume_after_a_crash_ends_with_the_same_weights(tiny, tmp_path, monkeypatch):
    straight = train(_cfg(tiny, tmp_path / "straight"))

    real_save_last, calls = loop.save_last, []

    def crash_after_first_epoch(out, state):
        real_save_last(out, state)
        calls.append(state["epoch"])
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_last", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny, tmp_path / "resumed"))
    monkeypatch.setattr(loop, "save_last", real_save_last)
    resumed = train(resume=tmp_path / "resumed")

    a, b = load_file(straight.out_dir / "model.safetensors"), load_file(resumed.out_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.accuracy == straight.accuracy
    rows = [json.loads(x) for x in (resumed.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["backbone_frozen"] for r in rows] == [True, False, False]  # the gradual schedule came back


@needs_cifar
def test_resume_refuses_changing_the_recipe(tiny, tmp_path):
    train(_cfg(tiny, tmp_path / "r", epochs=1))
    with pytest.raises(TransferkitError, match="only checkpoint_every, compile, device, epochs.*not lr"):
        train(resume=tmp_path / "r", lr=0.5)
    more = train(resume=tmp_path / "r", epochs=2)
    assert [h["epoch"] for h in more.history] == [1, 2]


@needs_cifar
def test_config_file_with_flag_overrides(tiny, tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text(f"data: {tiny}\nmodel: resnet18\nweights: none\nimage_size: 32\nlr: 1e-3\n"
                    f"epochs: 1\nval_split: 0.25\nbatch_size: 8\nout: {tmp_path / 'run'}\n")
    cfg = TrainConfig.from_yaml(path, strategy="linear")
    assert cfg.lr == 0.001 and cfg.strategy == "linear"
    logger = logging.getLogger("transferkit")
    before = (logger.level, list(logger.handlers))
    result = train(cfg)
    assert (logger.level, list(logger.handlers)) == before  # a library call leaves the logger as it found it
    assert "epoch 1/1" in (result.out_dir / "train.log").read_text()
    saved = TrainConfig.from_yaml(result.out_dir / "config.yaml")
    # resolved, as it trained: the preprocessing and the task the data showed
    assert saved == cfg.replace(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), task="single")
    assert 0 <= result.accuracy <= 1 and result.metrics["images"] == 18


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed (scripts/setup.sh installs it)")
def test_fashion_mnist_linear_probe_through_the_api(tmp_path):
    from conftest import needs_weights

    if needs_weights.args[0]:
        pytest.skip(needs_weights.kwargs["reason"])
    result = train(TrainConfig.create(recipe="demo", strategy="linear", max_train_images=1000, image_size=32,
                                      epochs=2, lr=5e-3, out=str(tmp_path / "fm")))
    assert result.metrics["images"] == 10000 and "test split of fashion-mnist" in result.measured_on
    assert result.accuracy > 0.6, f"{result.accuracy:.1%} on Fashion-MNIST test (chance 10%)"


@needs_cifar
def test_micro_batches_add_up_to_the_whole_batch_step(tiny, tmp_path, caplog):
    """Less memory per pass, the same training: gradients of the parts add up to the batch's."""
    same = dict(strategy="finetune", batchnorm="frozen", precision="fp32", epochs=2)  # bf16 rounds each pass apart
    whole = train(_cfg(tiny, tmp_path / "whole", **same))
    parts = train(_cfg(tiny, tmp_path / "parts", **same, micro_batch=3))
    assert "batch 8 in passes of up to 3" in caplog.text
    a, b = load_file(whole.out_dir / "model.safetensors"), load_file(parts.out_dir / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert [r["train_loss"] for r in parts.history] == pytest.approx([r["train_loss"] for r in whole.history])
    assert parts.accuracy == whole.accuracy


@needs_cifar
def test_trainable_blocks_train_only_the_last_blocks_and_the_cached_trunk_changes_nothing(tiny, tmp_path, caplog):
    kw = dict(strategy="finetune", trainable_blocks=2, augment=False)  # one view: the cache loses nothing
    cached = train(_cfg(tiny, tmp_path / "cached", **kw))
    assert "training the last 2 blocks on cached activations of layer3.1" in caplog.text
    assert "augmentation: none: trained on cached features" in (cached.out_dir / "report.md").read_text()
    live = train(_cfg(tiny, tmp_path / "live", feature_cache=False, **kw))
    assert "the blocks up to layer3.1 stay frozen and run every step" in caplog.text
    report = (live.out_dir / "report.md").read_text()
    assert "- strategy: finetune, the last 2 backbone blocks and the head (--trainable-blocks 2)" in report
    one_epoch = train(_cfg(tiny, tmp_path / "short", epochs=1, **kw))
    assert "train: features of 27 images from the cache" in caplog.text  # the 3rd run reused the trunk's
    a, b, c = (load_file(r.out_dir / "model.safetensors") for r in (cached, live, one_epoch))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    frozen = [k for k in a if not k.startswith(("layer4.", "fc."))]
    assert frozen and all(torch.equal(a[k], c[k]) for k in frozen)  # more epochs left them untouched
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("layer4."))
    assert cached.accuracy == live.accuracy


def test_trainable_blocks_that_do_not_fit_the_model_are_refused(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(TransferkitError, match="not ShuffleNetV2"):
        train(data=str(tmp_path / "data"), model="shufflenet_v2_x0_5", weights="none", trainable_blocks=2,
              out=str(tmp_path / "r"))
    with pytest.raises(TransferkitError, match="use it with --strategy finetune or gradual"):
        TrainConfig.create(strategy="linear", trainable_blocks=1)


@needs_cifar
def test_streaming_a_folder_from_its_files_trains_exactly_as_in_memory(tiny, tmp_path, monkeypatch, caplog):
    from transferkit import runtime

    in_memory = train(_cfg(tiny, tmp_path / "memory", epochs=2, stream="never"))
    # A machine with little memory: "auto" streams (here through 2 DataLoader worker processes).
    monkeypatch.setattr(runtime, "memory_bytes", lambda: 4 * 3 * 32 * 32 * 40)
    streamed = train(_cfg(tiny, tmp_path / "streamed", epochs=2, workers=2))
    assert "streaming" in caplog.text and "from its files" in caplog.text
    a, b = load_file(in_memory.out_dir / "model.safetensors"), load_file(streamed.out_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert streamed.accuracy == in_memory.accuracy


def test_a_streamed_folder_lists_files_that_are_not_images(tmp_path):
    from PIL import Image

    from transferkit.data.preprocess import Preprocessing
    from transferkit.data.sources import load_source

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), (80 * i, 0, 0)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "a" / "notes.jpg").write_text("not an image")
    (tmp_path / "b" / "empty.png").write_bytes(b"")
    src = load_source(str(tmp_path), preprocessing=Preprocessing(32, 36), splits=("train",), stream="always")
    assert sorted(Path(p).name for p, _ in src.skipped) == ["empty.png", "notes.jpg"]
    assert len(src.train) == 6 and src.train.images[torch.arange(6)].shape == (6, 3, 32, 32)


@needs_cifar
def test_train_tta_reports_what_eval_tta_measures(tiny, tmp_path, caplog):
    """--tta averages the mirror image into the final evaluation, also when the head trained on cached features
    (whose test split's features are then not computed: the mirror needs the whole model)."""
    from transferkit.evaluate import evaluate_run

    for name, kw in (("linear", dict(strategy="linear", tta=True)), ("fast", dict(recipe="fast", strategy="finetune"))):
        caplog.clear()
        run = train(_cfg(tiny, tmp_path / name, **kw, precision="fp32", epochs=2))  # 'fast': a finetune with --tta
        assert ("train: features of" in caplog.text) == (name == "linear") and "test: features of" not in caplog.text
        assert "with its mirror image" in run.measured_on
        assert "mirror image (--tta)" in (run.out_dir / "report.md").read_text()
        mirrored, _, _ = evaluate_run(run.out_dir, str(tiny), tta=True, workers=1)
        plain, _, _ = evaluate_run(run.out_dir, str(tiny), workers=1)
        assert run.metrics["confusion"] == mirrored["confusion"] != plain["confusion"]


@needs_cifar
def test_train_from_python_shows_its_progress_where_nobody_configured_logging(tiny, tmp_path):
    import subprocess
    import sys

    def call(out):
        return (f"train(data={str(tiny)!r}, model='resnet18', weights='none', image_size=32, epochs=1, batch_size=8, "
                f"val_split=0.25, workers=1, out={str(tmp_path / out)!r})")

    script = f"from transferkit import train; {call('one')}; {call('two')}"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("epoch 1/1  train_loss") == 2  # once per run, not silent, not doubled
