"""Property-based checks: whatever a user feeds predict or the config, no traceback escapes."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from transferkit import TrainConfig, TransferkitError
from transferkit.data.preprocess import Preprocessing
from transferkit.models import create_backbone
from transferkit.predict import Predictor


@pytest.fixture(scope="module")
def predictor():
    bb = create_backbone("mobilenet_v3_small", "none", num_classes=3)
    return Predictor(bb.model, ["a", "b", "c"], Preprocessing(32, 36, (0.5,) * 3, (0.25,) * 3), device="cpu")


def _image_bytes(mode, size, fmt, seed):
    g = torch.Generator().manual_seed(seed)
    w, h = size
    rgb = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    img = Image.fromarray(rgb).convert(mode)
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)
    except OSError:  # this format cannot hold this mode
        buf = io.BytesIO()
        img.save(buf, format="TIFF")
    return buf.getvalue()


images = st.builds(
    _image_bytes,
    st.sampled_from(["RGB", "L", "RGBA", "P", "CMYK", "I", "LA", "1"]),
    st.tuples(st.integers(1, 300), st.integers(1, 300)),
    st.sampled_from(["PNG", "TIFF", "JPEG", "WEBP", "BMP"]),
    st.integers(0, 1000),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.one_of(images, st.binary(max_size=300), images.map(lambda b: b[: len(b) // 2])),
                      min_size=1, max_size=4), topk=st.integers(1, 5))
def test_predict_never_raises_on_any_file(predictor, tmp_path_factory, files, topk):
    folder = tmp_path_factory.mktemp("fuzz")
    paths = []
    for i, raw in enumerate(files):
        (folder / f"f{i}.png").write_bytes(raw)
        paths.append(folder / f"f{i}.png")
    results, errors = predictor.predict_paths(paths, topk=topk)
    assert len(results) + len(errors) == len(files)
    for r in results:
        assert 1 <= len(r["top"]) <= 3 and all(0 <= t["prob"] <= 1 for t in r["top"])


values = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.floats(-2, 2), max_size=4))
keys = st.sampled_from(sorted(TrainConfig.__dataclass_fields__) + ["lr_rate", "epoch"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, values, max_size=5))
def test_any_config_values_are_accepted_or_explained(settings_):
    try:
        cfg = TrainConfig.create(**settings_)
    except TransferkitError as e:
        assert str(e)
        return
    TrainConfig.create(**{k: v for k, v in vars(cfg).items()})  # a valid config stays valid
