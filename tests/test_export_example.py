"""The README's no-torch example: an ImageNet MobileNetV2 exported to ONNX classifies a photo without torch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, needs_weights

pytest.importorskip("onnxruntime")
skimage_data = pytest.importorskip("skimage.data")

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@needs_weights
def test_example_classifies_chelsea_as_a_cat_where_torch_cannot_be_imported(tmp_path):
    from PIL import Image

    from transferkit import Predictor
    from transferkit.export import export_predictor

    pred = Predictor.from_pretrained("mobilenet_v2", device="cpu")
    photo = tmp_path / "chelsea.jpg"
    Image.fromarray(skimage_data.chelsea()).save(photo, quality=95)
    photos = [str(photo), skimage_data.astronaut(), Image.fromarray(skimage_data.coffee()), skimage_data.rocket()]
    rec = export_predictor(pred, tmp_path / "model.onnx", photos)  # a path, arrays and a PIL image
    assert rec["parity"]["passed"] and rec["parity"]["images"] == 4

    # A folder first on the path whose torch (and transferkit) cannot be imported.
    blocked = tmp_path / "no-torch"
    blocked.mkdir()
    for name in ("torch", "torchvision", "transferkit"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": str(blocked)}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked" in probe.stderr

    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "onnx_classify.py"), str(tmp_path / "model.onnx"),
                           str(photo)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    top1 = int(re.search(r"\(class (\d+)\)", proc.stdout)[1])
    assert top1 in IMAGENET_CATS, proc.stdout
    # ... and it names the class transferkit's own Predictor gives that file.
    assert proc.stdout.split(": ", 1)[1].startswith(pred.predict(photo, topk=1)[0][0][0]), proc.stdout
    assert Path(photo).is_file()
