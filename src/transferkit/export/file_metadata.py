"""The metadata an export carries: the Preprocessing and ModelCard, in the file and export.json.

The run's `Preprocessing` itself (its to_dict) and `ModelCard` itself (its to_json) travel with
the class names as ONNX `metadata_props` or TorchScript `_extra_files`; `preprocessing_of` and
`card_of` read them back. export.json beside the file records each export.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import runfiles
from ..checkpoint import ModelCard
from ..data.preprocess import Preprocessing
from ..files import atomic_write
from ..version import __version__

EXPORT_FILE = runfiles.EXPORT
EXTRA_FILE = "transferkit.json"  # TorchScript: the metadata, in the file's extra files
PREPROCESSING_KEY = "preprocessing"  # the metadata entry that holds Preprocessing.to_dict() as JSON
CARD_KEY = "model_card"  # the metadata entry that holds a run's ModelCard.to_json(), model.json


def metadata(classes: Sequence[str], pre: Preprocessing, *, temperature: float = 1.0,
             card: ModelCard | None = None, source: str = "") -> dict[str, str]:
    """What a consumer needs besides the graph, as the string pairs ONNX metadata_props holds.

    `preprocessing` is the Preprocessing itself (to_dict, as JSON) and `model_card` a run's
    ModelCard itself (to_json, as model.json holds it, with the classes, preprocessing and
    temperature exported): the entries transferkit reads back. The fields a consumer needs are
    also entries of their own (a number or a name as text, a list as JSON), for readers of single
    keys (earlier transferkit wrote only those).
    """
    rule = pre.to_dict()
    side = pre.image_size
    if card is not None:
        card = card.replace(classes=list(classes), preprocessing=pre, temperature=temperature)
    return {
        "transferkit_version": __version__,
        "classes": json.dumps(list(classes)),
        "input": f"uint8 RGB images, N x 3 x {side} x {side} (NCHW); /255, mean and std are inside "
                 "the graph",
        "output": "logits (N x classes); probabilities are softmax(logits / temperature)",
        PREPROCESSING_KEY: json.dumps(rule),
        **{k: v if isinstance(v, str) else json.dumps(v) for k, v in rule.items()},
        "crop": "center",
        "resize": f"shorter side to {pre.resize_size} px ({pre.interpolation}, antialiased), then "
                  f"a center crop of {side} x {side}; a square image no larger than {side} px is "
                  "instead upsampled whole (bilinear, no antialiasing, rounded to uint8)",
        "temperature": repr(float(temperature)),
        "weights_sha256": (card.sha256 if card is not None else None) or "",
        "source": source,
        **({CARD_KEY: card.to_json()} if card is not None else {}),
    }


def preprocessing_of(meta: dict[str, str]) -> Preprocessing:
    """The Preprocessing that a file's transferkit metadata holds.

    A file written before the metadata held it whole names its fields one by one and no
    interpolation: it was bilinear."""
    if PREPROCESSING_KEY in meta:
        return Preprocessing.from_dict(json.loads(meta[PREPROCESSING_KEY]))
    fields = ("image_size", "resize_size", "mean", "std")
    return Preprocessing.from_dict({k: json.loads(meta[k]) for k in fields})


def card_of(meta: dict[str, str]) -> ModelCard | None:
    """The run's ModelCard that a file's transferkit metadata holds; None for a file without one
    (a model exported without a run, or by transferkit before the metadata held the card)."""
    return ModelCard.from_json(meta[CARD_KEY]) if CARD_KEY in meta else None


def set_onnx_metadata(path: Path, meta: dict[str, str]) -> None:
    """Replace the metadata_props of the ONNX file at `path` by `meta`."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))


def copy_metadata(src: Path, dst: Path, extra: dict[str, str]) -> None:
    """Give the ONNX file `dst` the metadata of `src`, with `extra` entries added."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(src)).metadata_props}
    set_onnx_metadata(dst, {**meta, **extra})


def record(target: Path, rec: dict[str, Any]) -> None:
    """Add this export to export.json beside the file (one entry per file name)."""
    path = target.parent / EXPORT_FILE
    try:
        existing = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(existing, dict):
            existing = {}
    except (OSError, ValueError):
        existing = {}
    existing[target.name] = rec
    atomic_write(path, json.dumps(existing, indent=2))
