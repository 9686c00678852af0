"""transferkit export: ONNX and TorchScript files that agree with PyTorch, their metadata, bad input, predict, int8."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import SHARED_CIFAR, _have_mobilenet_weights, link_subset
from transferkit import Predictor, TrainConfig, train
from transferkit.checkpoint import ModelCard, read_card
from transferkit.cli import main
from transferkit.data.preprocess import Preprocessing
from transferkit.errors import CheckFailed, TransferkitError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from transferkit import export  # noqa: E402  (after the skips: it needs the export extra)

RUN_FILES = ("model.json", "model.safetensors", "config.yaml", "split.json")  # what export reads of a run


pytestmark = pytest.mark.usefixtures("restore_logger")  # conftest: cli.main repoints the log


@pytest.fixture(scope="module")
def runs(cifar_small, tmp_path_factory) -> dict[str, Path]:
    """Two real runs, built once: ImageNet MobileNetV2 fine-tuned briefly, and resnet18 from random weights
    (fp32, so the run folder's own predictions are fp32 like the exported model's)."""
    root = tmp_path_factory.mktemp("export-runs")
    common = dict(data=str(cifar_small), epochs=1, image_size=64, batch_size=32, max_train_images=60,
                  precision="fp32", workers=1)
    out = {}
    for name, model, weights in (("mnv2", "mobilenet_v2", "IMAGENET1K_V1"), ("r18", "resnet18", "none")):
        if weights != "none" and not _have_mobilenet_weights():
            pytest.skip("MobileNetV2 IMAGENET1K_V1 weights not on this machine")
        train(TrainConfig(model=model, weights=weights, out=str(root / name), **common))
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def exported(runs) -> dict[str, list[dict] | str]:
    """Each run exported to both formats at the default destinations, the parity check on 100 test images:
    MobileNetV2 through the CLI (its printed lines kept), resnet18 through the library."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(runs["mnv2"]), "--format", "all", "--check-images", "100"]) == 0
    r18 = export.export_run(runs["r18"], ("onnx", "torchscript"), check_images=100)
    return {"mnv2": json.loads((runs["mnv2"] / "export.json").read_text()), "r18": {r["file"]: r for r in r18},
            "printed": printed.getvalue()}


def _copy_run(run: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in RUN_FILES:
        shutil.copy2(run / f, dst / f)
    return dst


@pytest.mark.parametrize("name", ["mnv2", "r18"])
def test_both_formats_agree_with_pytorch_on_the_held_out_images(runs, exported, name):
    run = runs[name]
    card = json.loads((run / "model.json").read_text())
    assert set(exported[name]) == {"model.onnx", "model.pt"}
    saved = json.loads((run / "export.json").read_text())
    for fmt, file in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
        p = saved[file]["parity"]
        assert (run / file).is_file()
        assert p["images"] == 100 and "test split" in p["measured_on"]  # cifar_small's test split
        assert p["top1_agreement"] == 1.0 and p["max_abs_prob_diff"] <= 1e-4 and p["passed"], (fmt, p)
        assert saved[file]["metadata"]["weights_sha256"] == card["sha256"]

    # ONNX: uint8 NCHW input with a dynamic batch, logits out, the metadata a consumer needs.
    model = onnx.load(str(run / "model.onnx"))
    (inp,), (_,) = model.graph.input, model.graph.output
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == card["classes"]
    assert (meta["image_size"], meta["resize_size"]) == ("64", str(card["resize_size"]))
    assert json.loads(meta["mean"]) == card["mean"] and json.loads(meta["std"]) == card["std"]
    assert meta["weights_sha256"] == card["sha256"] and meta["transferkit_version"]
    assert meta["crop"] == "center" and "bilinear" in meta["interpolation"]

    # A batch size other than the traced one runs in both formats.
    x = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    logits = ort.InferenceSession(str(run / "model.onnx")).run(None, {"images": x.numpy()})[0]
    assert logits.shape == (5, 10)
    extra = {export.EXTRA_FILE: ""}
    ts = torch.jit.load(str(run / "model.pt"), _extra_files=extra)
    assert ts(x).shape == (5, 10)
    assert json.loads(extra[export.EXTRA_FILE])["classes"] == meta["classes"]
    assert torch.allclose(ts(x), torch.from_numpy(logits), atol=1e-3)


def test_cli_export_prints_the_parity_figures(runs, exported):
    printed = exported["printed"]
    for fmt, file in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
        assert f"{fmt}: {runs['mnv2'] / file}" in printed
    assert printed.count("parity with PyTorch on 100 images of the test split") == 2
    assert printed.count("top-1 agreement 100.00%") == 2


class TinyNet(nn.Module):
    """A small convolutional classifier: fast to export, quantize and check."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_fixed_batch_export_takes_that_batch_and_checks_every_image(tmp_path):
    out = tmp_path / "m.onnx"
    rec = export.export_model(TinyNet().eval(), Preprocessing(16, 16), ["a", "b", "c"], out, _check_images(10),
                              batch=4)  # 10 images: batches of 4, 4 and 2 (padded)
    assert rec["batch"] == 4 and rec["parity"]["images"] == 10 and rec["parity"]["passed"]
    assert [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim] == [4, 3, 16, 16]


def test_disagreeing_export_exits_1_and_leaves_nothing(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export.compare, "MAX_PROB_DIFF", -1.0)  # no export can be this close: each now disagrees
    out = tmp_path / "m.pt"
    assert main(["export", str(runs["r18"]), "--format", "torchscript", "--out", str(out), "--check-images", "8"]) == 1
    err = capsys.readouterr().err
    assert "disagrees with PyTorch" in err and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def test_check_images_from_another_folder_with_data(runs, tmp_path, capsys):
    other = link_subset(SHARED_CIFAR / "test", tmp_path / "other", 2, ["cat", "dog", "ship"])  # 6 unseen photos
    out = tmp_path / "m.pt"
    assert main(["export", str(runs["r18"]), "--format", "torchscript", "--out", str(out), "--data", str(other)]) == 0
    p = json.loads((tmp_path / "export.json").read_text())["m.pt"]["parity"]
    assert p["images"] == 6 and str(other) in p["measured_on"] and p["passed"]


class Branchy(nn.Module):
    """Python control flow on the data: a trace records one branch, so it is wrong on the other images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x.mean((2, 3))
        return logits if bool(x.mean() > 0) else -logits


def _check_images(n: int = 8, side: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)
    x[: n // 2] //= 4  # dark images: below the mean, the other branch
    return x


def test_a_trace_that_records_one_branch_fails_the_parity_check(tmp_path):
    out = tmp_path / "m.pt"
    pre = Preprocessing(16, 16)
    with pytest.raises(CheckFailed, match="top-1 agreement 50.00%") as e:  # traced on a dark batch of 4
        export.export_model(Branchy(), pre, ["a", "b", "c"], out, _check_images(), fmt="torchscript", batch=4)
    assert e.value.exit_code == 1
    assert list(tmp_path.iterdir()) == []


class Histogram(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.histc(x, bins=3)[None].expand(x.shape[0], -1)


def test_untraceable_model_names_the_operator_and_the_format_that_works(tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(TransferkitError) as e:
        export.export_model(Histogram(), Preprocessing(16, 16), ["a", "b", "c"], out, _check_images())
    msg = str(e.value)
    assert "aten::histc" in msg and "--format torchscript exports it" in msg
    assert "\n" not in msg and list(tmp_path.iterdir()) == []
    # ... and that format does export it, checked like any other.
    rec = export.export_model(Histogram(), Preprocessing(16, 16), ["a", "b", "c"], tmp_path / "m.pt",
                              _check_images(), fmt="torchscript")
    assert rec["parity"]["passed"]


def _fails(argv: list[str], capsys, code: int = 2) -> str:
    assert main(argv) == code
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors  # one sentence, no traceback
    return errors[0]


def test_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert "not a transferkit run folder" in _fails(["export", str(tmp_path)], capsys)
    assert list(tmp_path.iterdir()) == []


def test_weights_that_fail_their_checksum(runs, tmp_path, capsys):
    run = _copy_run(runs["r18"], tmp_path / "run")
    weights = run / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(raw)
    assert "does not match the checksum" in _fails(["export", str(run)], capsys)
    assert not (run / "model.onnx").exists() and not (run / "export.json").exists()


def test_unknown_format(runs, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", str(runs["r18"]), "--format", "onxx"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'onxx'" in err and "did you mean 'onnx'" in err
    assert not (runs["r18"] / "model.onxx").exists()


def test_out_in_an_unwritable_folder(runs, tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through permissions; /proc takes no new files from anyone
        locked = Path("/proc/transferkit-test.onnx")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        locked = tmp_path / "ro" / "m.onnx"
    assert "cannot write into" in _fails(["export", str(runs["r18"]), "--out", str(locked)], capsys)
    assert not locked.exists()
    # A folder to create there cannot be created either.
    new = locked.parent / "new" / "m.onnx"
    assert "cannot create the folder" in _fails(["export", str(runs["r18"]), "--out", str(new)], capsys)
    assert not (locked.parent / "new").exists()


def test_out_in_a_folder_that_does_not_exist_yet_creates_it(runs, tmp_path, monkeypatch, capsys):
    """The README's `export --out deploy/c10.onnx` on a fresh tree: deploy/ is created; an export that
    fails leaves no folder behind."""
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(runs["r18"]), "--out", "deploy/c10.pt", "--format", "torchscript",
                 "--check-images", "4"]) == 0
    assert (tmp_path / "deploy" / "c10.pt").is_file()
    assert "c10.pt" in json.loads((tmp_path / "deploy" / "export.json").read_text())
    monkeypatch.setattr(export.compare, "MAX_PROB_DIFF", -1.0)  # every export now disagrees
    assert main(["export", str(runs["r18"]), "--out", "more/deploy/c10.pt", "--format", "torchscript",
                 "--check-images", "4"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy"]


def test_export_never_writes_over_a_run_file_and_needs_overwrite_for_others(runs, tmp_path, capsys):
    run = _copy_run(runs["r18"], tmp_path / "run")
    shutil.copy2(runs["r18"] / "last.pt", run / "last.pt")
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    for name in ("model.safetensors", "model.json", "last.pt", "config.yaml"):
        for more in ([], ["--overwrite"]):
            err = _fails(["export", str(run), "--out", str(run / name), "--check-images", "4", *more], capsys)
            assert f"{run / name} is a file of the run folder" in err
    # ... nor of another run's folder (the name is the run's, not the destination's suffix).
    assert "is a file of the run folder" in _fails(["export", str(runs["r18"]), "--format", "torchscript",
                                                    "--out", str(run / "last.pt")], capsys)
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before
    assert "export.json is the name of the record" in _fails(["export", str(run), "--out",
                                                              str(tmp_path / "export.json")], capsys)

    # Any other existing file: --overwrite, or a sentence and the file kept.
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"keep me")
    argv = ["export", str(run), "--format", "torchscript", "--out", str(mine), "--check-images", "4"]
    assert "already exists; pass --overwrite" in _fails(argv, capsys)
    assert mine.read_bytes() == b"keep me"
    (tmp_path / "export.json").write_text("my notes")  # export writes its record there: not over this
    (tmp_path / "mine.pt").unlink()
    assert "not transferkit's record of exports" in _fails(argv, capsys)
    assert (tmp_path / "export.json").read_text() == "my notes" and not mine.exists()
    (tmp_path / "export.json").unlink()
    assert main(argv) == 0
    assert main(argv + ["--overwrite"]) == 0 and torch.jit.load(str(mine))(_check_images(2, 64)).shape == (2, 10)


def test_opset_is_the_one_written_or_refused_with_the_range(runs, tmp_path, capsys):
    out = tmp_path / "m11.onnx"
    assert main(["export", str(runs["r18"]), "--opset", "11", "--out", str(out), "--check-images", "15"]) == 0
    assert [o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")] == [11]
    rec = json.loads((tmp_path / "export.json").read_text())["m11.onnx"]
    assert rec["opset"] == 11 and rec["parity"]["passed"]
    assert rec["parity"]["images"] == 15  # as many as asked: 10 classes' shares rounded down are topped up
    assert "opset 11" in capsys.readouterr().out
    for bad in ("5", "999"):
        err = _fails(["export", str(runs["r18"]), "--opset", bad, "--out", str(tmp_path / "x.onnx")], capsys)
        assert f"--opset {bad}: transferkit writes ONNX opsets 7 to 23" in err
    # a TorchScript file has no opset: asking for one is said, not ignored
    err = _fails(["export", str(runs["r18"]), "--format", "torchscript", "--opset", "11",
                  "--out", str(tmp_path / "x.pt")], capsys)
    assert "--opset 11 is for ONNX files" in err and not (tmp_path / "x.pt").exists()
    # Above 18 too, the file is at the opset asked; int8 needs 13 or later.
    rec = export.export_model(TinyNet().eval(), Preprocessing(16, 16), ["a", "b", "c"], tmp_path / "t.onnx",
                              _check_images(), opset=21)
    assert rec["opset"] == 21 == onnx.load(str(tmp_path / "t.onnx")).opset_import[0].version
    with pytest.raises(TransferkitError, match="--quantize int8 writes opsets 13 to 23"):
        export.export_model(TinyNet().eval(), Preprocessing(16, 16), ["a", "b", "c"], tmp_path / "q.onnx",
                            _check_images(), opset=11, quantize="int8", accuracy_on=(_check_images(), torch.zeros(8)))
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "q.onnx").exists()


def test_missing_onnx_packages_name_the_extra(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    err = _fails(["export", str(runs["r18"]), "--out", str(tmp_path / "m.onnx")], capsys)
    assert "onnxruntime" in err and "pip install 'transferkit[export]'" in err
    assert list(tmp_path.iterdir()) == []


def _predictions(argv: list[str], capsys) -> list[dict]:
    assert main(["predict", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["predictions"]


@pytest.mark.parametrize("tta", [[], ["--tta"]], ids=["plain", "tta"])
def test_predict_with_the_onnx_file_gives_the_run_folders_answers(runs, exported, cifar_small, capsys, tta):
    run = runs["mnv2"]
    images = [str(cifar_small / "test" / c) for c in ("cat", "ship")]
    from_onnx = _predictions([str(run / "model.onnx"), *images, "--topk", "10", *tta], capsys)
    from_run = _predictions([str(run), *images, "--topk", "10", *tta], capsys)
    if tta:  # the mirror image was averaged in: the probabilities are not the plain ones
        plain = _predictions([str(run), *images, "--topk", "10"], capsys)
        assert any(abs(a["top"][0]["prob"] - b["top"][0]["prob"]) > 1e-3 for a, b in zip(plain, from_run))
    assert len(from_onnx) == len(from_run) == 40
    for a, b in zip(from_onnx, from_run):
        assert a["file"] == b["file"] and a["top"][0]["class"] == b["top"][0]["class"]
        pa = {t["class"]: t["prob"] for t in a["top"]}
        assert max(abs(pa[t["class"]] - t["prob"]) for t in b["top"]) <= 1e-4
    # The Python Predictor of a run folder, handed the ONNX file instead, names the class that runs it.
    with pytest.raises(TransferkitError, match="ONNX file, not a run folder.*OnnxPredictor"):
        Predictor.from_run(run / "model.onnx")


def test_predict_refuses_onnx_without_metadata_or_truncated(runs, exported, cifar_small, tmp_path, capsys):
    image = str(next((cifar_small / "test" / "cat").iterdir()))
    bare = onnx.load(str(runs["r18"] / "model.onnx"))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    assert "no transferkit metadata" in _fails(["predict", str(tmp_path / "bare.onnx"), image], capsys)
    raw = (runs["r18"] / "model.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(raw[: len(raw) // 2])
    assert "truncated or damaged" in _fails(["predict", str(tmp_path / "cut.onnx"), image], capsys)


def test_a_flipped_bit_in_the_onnx_weights_is_refused_and_a_file_without_a_checksum_is_said(
        runs, exported, cifar_small, tmp_path, capsys):
    src = runs["r18"] / "model.onnx"
    raw = src.read_bytes()
    model = onnx.load(str(src))
    head = next(w for w in model.graph.initializer if sorted(w.dims) == [10, 512])  # resnet18's fc
    at = raw.find(head.raw_data)
    assert at > 0
    flipped = bytearray(raw)
    flipped[at + 4 * 1000 + 2] ^= 0x10  # one bit of one head weight
    (tmp_path / "flipped.onnx").write_bytes(flipped)
    image = str(next((cifar_small / "test" / "cat").iterdir()))
    err = _fails(["predict", str(tmp_path / "flipped.onnx"), image], capsys)
    assert "does not match the checksum it was exported with" in err
    with pytest.raises(TransferkitError, match="does not match the checksum"):
        export.OnnxPredictor(tmp_path / "flipped.onnx")
    # export.json records the whole file's sha256 (as sha256sum says it); the file, that of all of it but
    # the entry that holds it.
    rec = exported["r18"]["model.onnx"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert rec["sha256"] == hashlib.sha256(raw).hexdigest()
    assert meta["transferkit_sha256"] == rec["metadata"]["transferkit_sha256"]

    # A file of an earlier export (no checksum) predicts, and says in one line that it cannot be checked.
    del model.metadata_props[:]
    for k, v in meta.items():
        if k != "transferkit_sha256":
            model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(tmp_path / "old.onnx"))
    assert main(["predict", str(tmp_path / "old.onnx"), image]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "checksum" in line]
    assert len(said) == 1 and "cannot be checked" in said[0], said


def test_export_says_each_figure_once_with_the_split_and_count_it_had(runs, tmp_path, capsys, monkeypatch):
    """One parity line per file; fewer check images than asked for is said; int8's accuracy names the split
    it was measured on (here a val split, not a test split) and a change of zero is "+0.00", never "-0.00"."""
    other = tmp_path / "other"
    link_subset(SHARED_CIFAR / "train", other / "train", 2)
    link_subset(SHARED_CIFAR / "test", other / "val", 1)  # 10 images
    monkeypatch.setattr(export.int8, "_accuracy", lambda logits, labels: 0.5)  # fp32 and int8 alike
    out = tmp_path / "m.int8.onnx"
    assert main(["export", str(runs["r18"]), "--quantize", "int8", "--max-drop", "100", "--check-images", "512",
                 "--data", str(other), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert printed.count("max |softmax difference|") == 1, printed
    assert f"all 10 images of the val split of {other} (fewer than the 512 that --check-images asked for)" in printed
    (int8_line,) = [line for line in printed.splitlines() if line.strip().startswith("int8 (")]
    assert f"accuracy on the val split of {other} 50.00% -> 50.00% (10 images, +0.00 points)" in int8_line
    assert "test accuracy" not in printed and "-0.00" not in printed
    q = json.loads((tmp_path / "export.json").read_text())["m.int8.onnx"]["quantization"]
    assert q["images"] == 10 and "val split" in q["measured_on"]


def test_int8_with_data_that_has_no_train_split_calibrates_on_the_runs_own_training_images(runs, tmp_path):
    """--data names the images int8's accuracy is measured on; static int8 calibrates on the run's training
    images, so a folder with only test/ works (it stopped with "no 'train' split; choose --split", a flag
    export does not have)."""
    other = tmp_path / "only-test"
    link_subset(SHARED_CIFAR / "test", other / "test", 2)
    out = tmp_path / "m.int8.onnx"
    assert main(["export", str(runs["r18"]), "--quantize", "int8", "--max-drop", "100", "--check-images", "8",
                 "--data", str(other), "--out", str(out)]) == 0
    q = json.loads((tmp_path / "export.json").read_text())["m.int8.onnx"]["quantization"]
    assert "static" in q["tried"] and q["calibration_images"] > 0 and "test split" in q["measured_on"]


def test_the_file_holds_the_runs_model_card_and_a_file_without_one_still_loads(runs, exported, tmp_path):
    """The ONNX file carries the run's ModelCard itself (its to_json, as model.json holds it);
    OnnxPredictor takes the classes and temperature from it, and from their single entries in a
    file written before the metadata held the card."""
    run = runs["r18"]
    card = read_card(run)
    model = onnx.load(str(run / "model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert ModelCard.from_json(meta["model_card"]) == card
    now = export.OnnxPredictor(run / "model.onnx")
    assert now.card == card and (now.classes, now.temperature) == (card.classes, card.temperature)

    del model.metadata_props[:]
    for k, v in meta.items():
        if k not in ("model_card", "preprocessing", export.CHECKSUM_KEY):  # what transferkit wrote before either
            model.metadata_props.add(key=k, value="2.5" if k == "temperature" else v)
    onnx.save(model, str(tmp_path / "old.onnx"))
    old = export.OnnxPredictor(tmp_path / "old.onnx")
    assert old.card is None and old.classes == card.classes and old.temperature == 2.5
    assert old.preprocessing == card.preprocessing  # a bilinear run
    image = torch.full((3, 40, 60), 90, dtype=torch.uint8)
    assert [c for c, _ in old.predict(image, topk=3)[0]] == [c for c, _ in now.predict(image, topk=3)[0]]


def test_int8_records_accuracy_before_and_after(runs, tmp_path, capsys):
    run = _copy_run(runs["mnv2"], tmp_path / "run")
    assert main(["export", str(run), "--quantize", "int8", "--max-drop", "100", "--check-images", "16"]) == 0
    assert "int8 (" in capsys.readouterr().out
    q = json.loads((run / "export.json").read_text())["model.int8.onnx"]["quantization"]
    assert q["images"] == 200 and "test split" in q["measured_on"]
    assert q["method"] in ("static", "dynamic") and set(q["tried"]) >= {q["method"]}
    assert q["drop_points"] == pytest.approx(100 * (q["accuracy_fp32"] - q["accuracy_int8"]), abs=1e-3)
    assert "top1_agreement" in q["parity_vs_fp32"]
    fp32 = (runs["mnv2"] / "model.safetensors").stat().st_size
    assert (run / "model.int8.onnx").stat().st_size < fp32 / 2  # int8 weights: a quarter of the bytes and a graph
    meta = {p.key: p.value for p in onnx.load(str(run / "model.int8.onnx")).metadata_props}
    assert meta["quantization"].startswith("int8") and json.loads(meta["classes"])[0] == "airplane"



def test_int8_that_loses_more_than_max_drop_is_refused(tmp_path):
    x = _check_images(24)
    labels = export.run_torch(export.Deployable(TinyNet().eval(), Preprocessing(16, 16)), x).argmax(1)  # fp32: 100%
    out = tmp_path / "m.int8.onnx"
    with pytest.raises(CheckFailed, match="more than --max-drop -1000") as e:  # any result is a drop of more
        export.export_model(TinyNet().eval(), Preprocessing(16, 16), ["a", "b", "c"], out, x, quantize="int8",
                            calibration=x, accuracy_on=(x, labels), max_drop=-1000)
    assert e.value.exit_code == 1 and "nothing was written" in str(e.value)
    assert list(tmp_path.iterdir()) == []
