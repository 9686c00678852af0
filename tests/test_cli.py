"""End to end through the command line: train -> run folder -> eval -> predict, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_CIFAR, link_subset, needs_cifar, needs_weights, run_cli


def test_train_writes_a_complete_run_folder_and_beats_chance(trained_run, cifar_small):
    out, proc = trained_run
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "model.json", "last.pt", "report.md",
                 "report_confusion.png", "curves.png", "train.log"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all(r["backbone_frozen"] for r in rows)
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"][0] == "airplane" and meta["num_classes"] == 10 and meta["image_size"] == 64
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and "IMAGENET1K_V1" in meta["weights"]
    assert meta["versions"]["torch"] == torch.__version__
    report = (out / "report.md").read_text()
    assert "test split" in report and "200 images" in report and "64x64" in report
    assert "epoch 3/3" in proc.stderr and "run folder:" in proc.stdout
    acc = json.loads((out / "report.json").read_text())["accuracy"]
    assert acc > 0.35, f"linear probe on 320 CIFAR-10 images reached only {acc:.1%} (chance is 10%)"


def test_eval_reproduces_the_test_accuracy_of_training(trained_run, cifar_small):
    out, _ = trained_run
    proc = run_cli("eval", out, "--data", cifar_small, "--json")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics["accuracy"] == pytest.approx(json.loads((out / "report.json").read_text())["accuracy"])
    assert metrics["images"] == 200 and len(metrics["per_class"]) == 10 and "top5" in metrics
    assert (out / f"eval-{cifar_small.name}-test.md").is_file()


def test_eval_at_another_input_size_and_with_mirror_tta(trained_run, cifar_small, tmp_path):
    out, _ = trained_run
    proc = run_cli("eval", out, "--data", cifar_small, "--image-size", "80", "--tta", "--json")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert "model input 80x80, with its mirror image" in metrics["measured_on"]
    assert metrics["accuracy"] > 0.35 and (out / f"eval-{cifar_small.name}-test-80px-tta.md").is_file()
    assert run_cli("eval", out, "--data", cifar_small, "--image-size", "64").returncode == 0  # the trained size
    assert (out / f"eval-{cifar_small.name}-test.md").is_file() and not list(out.glob("eval-*-64px*"))

    # With --tta an image and its mirror image get the same prediction; without it they differ.
    photo = next((SHARED_CIFAR / "test" / "horse").iterdir())
    Image.open(photo).save(tmp_path / "a.png")
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "b.png")

    def probs(*extra):
        proc = run_cli("predict", out, tmp_path / "a.png", tmp_path / "b.png", "--topk", "10", "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        return [{t["class"]: t["prob"] for t in r["top"]} for r in json.loads(proc.stdout)["predictions"]]

    a, b = probs("--tta")
    assert a == pytest.approx(b, abs=1e-3)
    a, b = probs()
    assert a != pytest.approx(b, abs=1e-3)

    proc = run_cli("eval", out, "--image-size", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--image-size 0" in proc.stderr


def test_eval_refuses_data_with_other_classes(trained_run, tmp_path):
    out, _ = trained_run
    link_subset(SHARED_CIFAR / "test", tmp_path / "other", 2, ["cat", "dog"])
    (tmp_path / "other" / "cat").rename(tmp_path / "other" / "kitten")
    proc = run_cli("eval", out, "--data", tmp_path / "other")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "kitten" in proc.stderr and "airplane" in proc.stderr


def _odd_images(folder):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.jpg")
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(folder / "alpha.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(folder / "palette.gif")
    Image.fromarray((rng.integers(0, 65535, (300, 200))).astype(np.uint16)).save(folder / "deep16.png")
    Image.fromarray(rgb).resize((1000, 700)).save(folder / "big.webp")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    (folder / "cut.jpg").write_bytes((folder / "rgb.jpg").read_bytes()[:100])


def test_predict_any_image_mode_and_reports_unreadable_files(trained_run, tmp_path):
    out, _ = trained_run
    _odd_images(tmp_path)
    proc = run_cli("predict", out, tmp_path, "--topk", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    predicted = {p.split("/")[-1] for p in (r["file"] for r in result["predictions"])}
    assert predicted == {"rgb.jpg", "gray.png", "alpha.png", "cmyk.jpg", "palette.gif", "deep16.png", "big.webp"}
    for r in result["predictions"]:
        assert len(r["top"]) == 3 and sum(t["prob"] for t in r["top"]) <= 1.0 + 1e-6
        assert r["top"][0]["prob"] >= r["top"][1]["prob"]
    failed = {e["file"].split("/")[-1] for e in result["errors"]}
    assert failed == {"empty.jpg", "notes.png", "cut.jpg"}
    assert "skipped" in proc.stderr and "Traceback" not in proc.stderr
    # A path named on the command line that does not exist is a mistake, not a file to skip.
    proc = run_cli("predict", out, tmp_path / "rgb.jpg", tmp_path / "missing.jpg")
    assert proc.returncode == 2 and "no such file or folder: " in proc.stderr and "missing.jpg" in proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr


@needs_cifar
@needs_weights
def test_predict_names_real_cifar_images(trained_run, tmp_path):
    """Unseen CIFAR-10 test images (not in the run's train or test subset), predicted by folder."""
    out, _ = trained_run
    folder = tmp_path / "unseen"
    folder.mkdir()
    for c in sorted(p.name for p in (SHARED_CIFAR / "test").iterdir()):
        for i in range(500, 505):
            (folder / f"{c}_{i}.jpg").symlink_to(SHARED_CIFAR / "test" / c / f"{i:04d}.jpg")
    proc = run_cli("predict", out, folder, "--topk", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 50
    right = sum(line.split("/")[-1].split("_")[0] == line.split(": ")[1].rsplit(" ", 1)[0] for line in lines)
    assert right >= 15, f"{right}/50 right (chance: 5)"


def test_a_finished_run_is_not_overwritten_by_accident(trained_run, cifar_small):
    out, _ = trained_run
    proc = run_cli("train", "--data", cifar_small, "--out", out)
    assert proc.returncode == 2 and "--resume" in proc.stderr and "--overwrite" in proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--data", "DATA", "--model", "resnet5"], "did you mean 'resnet50'"),
    (["train", "--data", "DATA", "--model", "resnet18", "--weights", "/nowhere/w.pth"], "does not exist"),
    (["train", "--data", "DATA", "--strategy", "linaer"], "invalid choice"),
    (["predict", "NOT_A_RUN", "x.jpg"], "not a transferkit run folder"),
])
def test_bad_arguments_exit_2_with_a_message(tmp_path, args, message):
    (tmp_path / "data").mkdir()
    args = [str(tmp_path / "data") if a == "DATA" else a for a in args]
    proc = run_cli(*args, "--out", tmp_path / "run") if args[0] == "train" else run_cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_empty_and_one_class_folders_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("train", "--data", empty, "--weights", "none", "--out", tmp_path / "r1")
    assert proc.returncode == 2 and "no class folders" in proc.stderr and "Traceback" not in proc.stderr
    one = tmp_path / "one" / "cat"
    one.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(one / f"{i}.png")
    proc = run_cli("train", "--data", tmp_path / "one", "--weights", "none", "--out", tmp_path / "r2")
    assert proc.returncode == 2 and "one class" in proc.stderr and "Traceback" not in proc.stderr


def test_models_lists_backbones_and_offline_weights():
    proc = run_cli("models")
    assert proc.returncode == 0
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert {"resnet18", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "vit_b_16"} <= rows.keys()
    from torchvision.models import MobileNet_V2_Weights

    from transferkit.models import local_weight_file

    if local_weight_file(MobileNet_V2_Weights.IMAGENET1K_V1) is not None:
        assert rows["mobilenet_v2"].split()[1] == "IMAGENET1K_V1"


def test_a_run_folder_is_locked_while_a_run_writes_it(cifar_small, tmp_path):
    """A second training into the same --out is refused by name; the first finishes untouched."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = ["train", "--data", cifar_small, "--model", "resnet18", "--weights", "none", "--image-size", "32",
            "--epochs", "4", "--batch-size", "8", "--workers", "1", "--out", out]
    first = subprocess.Popen([sys.executable, "-m", "transferkit", *map(str, args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        # config.yaml is written once the run has its data and weights, and before it trains (4 epochs)
        while not (out / "config.yaml").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        second = run_cli(*args, "--overwrite")
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"is being written by another transferkit run (process {first.pid})" in second.stderr
        assert run_cli("eval", out, "--data", cifar_small).returncode in (0, 2)  # eval may read it meanwhile
    finally:
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    more = run_cli("train", "--resume", out, "--epochs", "7")
    assert more.returncode == 0  # the lock went with the process
    # Its 4-epoch schedule had ended: stretching it says what the added epochs get, and what trains more.
    assert "schedule had ended after epoch 4" in more.stderr and f"--weights {out / 'model.safetensors'}" in more.stderr


def test_an_empty_class_folder_and_an_out_inside_the_data_are_refused(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (i * 40, 90 if c == "cat" else 180, 0)).save(tmp_path / "d" / c / f"{i}.png")
    (tmp_path / "d" / "ghost").mkdir()
    proc = run_cli("train", "--data", tmp_path / "d", "--weights", "none", "--out", tmp_path / "r1")
    assert proc.returncode == 2 and "without images" in proc.stderr and "ghost" in proc.stderr
    # A class whose files all fail to open would add an output that never trains, too.
    (tmp_path / "d" / "ghost" / "empty.jpg").write_bytes(b"")
    (tmp_path / "d" / "ghost" / "text.png").write_text("not an image")
    proc = run_cli("train", "--data", tmp_path / "d", "--weights", "none", "--out", tmp_path / "r1")
    assert proc.returncode == 2 and "without a readable image: ghost" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r1").exists()
    for f in (tmp_path / "d" / "ghost").iterdir():
        f.unlink()
    (tmp_path / "d" / "ghost").rmdir()
    proc = run_cli("train", "--data", tmp_path / "d", "--weights", "none", "--out", tmp_path / "d" / "run")
    assert proc.returncode == 2 and "inside --data" in proc.stderr and not (tmp_path / "d" / "run").exists()
    proc = run_cli("train", "--model", "resnet18")
    assert proc.returncode == 2 and "train needs --data" in proc.stderr and "transferkit demo" in proc.stderr


def test_overwrite_with_a_mistake_in_the_new_settings_keeps_the_old_run(cifar_small, tmp_path):
    out = tmp_path / "run"
    base = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--epochs", "1", "--workers", "1",
            "--out", out]
    assert run_cli("train", "--data", cifar_small, *base).returncode == 0
    assert run_cli("export", out).returncode == 0 and (out / "model.onnx").is_file()
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.name not in ("train.log", ".lock")}
    for mistake in (["--data", tmp_path / "typo"], ["--data", cifar_small, "--model", "resnet5"]):
        proc = run_cli("train", *base, *mistake, "--overwrite")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert {f.name: f.read_bytes() for f in out.iterdir() if f.name not in ("train.log", ".lock")} == before
    # `demo` into a folder that holds another run refuses too, before it trains.
    proc = run_cli("demo", "--out", out)
    assert proc.returncode == 2 and "not the demo's" in proc.stderr and "--overwrite" in proc.stderr
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.name not in ("train.log", ".lock")} == before
    assert run_cli("train", "--data", cifar_small, *base, "--overwrite", "--seed", "1").returncode == 0
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]  # replaced once it was good
    # The old run's export would answer for the old model: it goes with it.
    assert not (out / "model.onnx").exists() and not (out / "export.json").exists()


def test_models_says_how_many_have_weights_here_lists_only_those_with_available_and_stops_quietly_in_head():
    everything = run_cli("models")
    available = run_cli("models", "--available")
    assert everything.returncode == 0 and available.returncode == 0, available.stderr
    rows = [line.split() for line in available.stdout.splitlines()[1:]]
    assert all(row[1] != "-" for row in rows), rows  # each one names weights on this machine
    total = len(everything.stdout.splitlines()) - 1
    assert f"{total:,} models, {len(rows):,} with weights on this machine" in everything.stderr, everything.stderr
    assert "transferkit models --available" in everything.stderr
    # `transferkit models | head -1`: the reader closes the pipe after a line, and no traceback follows
    proc = subprocess.Popen([sys.executable, "-m", "transferkit", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("model ")
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
