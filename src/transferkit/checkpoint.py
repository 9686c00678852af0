"""Run-folder files: weights as safetensors + the model card
(model.json), the resumable last checkpoint.

Every file is written to a temporary name and renamed, so a crash leaves the previous file.
Nothing here unpickles: safetensors for weights, torch.load(weights_only=True) for the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from safetensors.torch import load_file, save

from . import runfiles
from .data.preprocess import Preprocessing
from .errors import TransferkitError
from .files import atomic_write

log = logging.getLogger(__name__)

MODEL_FILE, META_FILE, LAST_FILE = runfiles.MODEL, runfiles.CARD, runfiles.LAST
FORMAT = 2  # of model.json: 1 was transferkit 0.1's flat file (the same fields, and native_size)


@dataclass(frozen=True)
class ModelCard:
    """model.json: what a run folder's weights are and how images become their input.

    Written as flat JSON (the preprocessing's fields beside the others), so format-1 files of
    earlier versions read the same.
    """

    arch: str
    head: str
    classes: list[str]
    preprocessing: Preprocessing
    build_kwargs: dict = field(default_factory=dict)
    weights: str = ""  # where the backbone's weights came from
    data: str = ""  # the data set it was trained on
    strategy: str = ""
    precision: str = "fp32"  # what it trained in; a run trained in fp32 is evaluated in fp32
    versions: dict = field(default_factory=lambda: current_versions())
    best_epoch: int | None = None
    val_acc: float | None = None
    epochs_trained: int | None = None
    batch_size: int | None = None
    sha256: str | None = None  # of model.safetensors
    temperature: float = 1.0  # probabilities are softmax(logits / temperature); --calibrate fits it
    task: str = "single"  # or "multilabel": a sigmoid per label (task.py)
    # multi-label: each label is answered when its sigmoid is >= its threshold (chosen on val)
    thresholds: list[float] | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.arch, str) and isinstance(self.head, str)
                and isinstance(self.build_kwargs, dict)):
            raise ValueError("arch and head must be names, build_kwargs a mapping")
        if not (isinstance(self.classes, list) and len(self.classes) >= 2
                and all(isinstance(c, str) for c in self.classes)):
            raise ValueError(f"classes must be a list of at least two names, not {self.classes!r}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must not repeat a name: {self.classes}")
        if (isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float))
                or not (0 < self.temperature < float("inf"))):
            raise ValueError(f"temperature must be a positive number, not {self.temperature!r}")
        if self.task not in ("single", "multilabel"):
            raise ValueError(f"task must be single or multilabel, not {self.task!r}")
        if self.thresholds is not None and not (
                isinstance(self.thresholds, list) and len(self.thresholds) == len(self.classes)
                and all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1
                        for t in self.thresholds)):
            raise ValueError(f"thresholds must be one number in [0, 1] per class, not "
                             f"{self.thresholds!r}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def replace(self, **changes: Any) -> ModelCard:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name != "preprocessing"}
        return json.dumps({"format": FORMAT, **d, "num_classes": self.num_classes,
                           **self.preprocessing.to_dict()}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        d = {"versions": {}, **json.loads(text)}  # not today's versions for a file that names none
        if not isinstance(d.get("format", 1), int) or d.get("format", 1) > FORMAT:
            raise ValueError(f"format {d.get('format')!r} is newer than this transferkit reads "
                             f"({FORMAT}); upgrade transferkit")
        if "num_classes" in d and d["num_classes"] != len(d.get("classes", [])):
            raise ValueError(f"num_classes {d['num_classes']} but "
                             f"{len(d.get('classes', []))} class names")
        names = {f.name for f in dataclasses.fields(cls)} - {"preprocessing"}
        return cls(**{k: v for k, v in d.items() if k in names},
                   preprocessing=Preprocessing.from_dict(d))


def current_versions() -> dict[str, str]:
    """The versions a model card records: transferkit, torch, torchvision,
    Python (and timm where a timm model was built: it is imported only then)."""
    from .version import __version__

    versions = {"transferkit": __version__, "torch": torch.__version__,
                "torchvision": torchvision.__version__, "python": platform.python_version()}
    if "timm" in sys.modules:
        versions["timm"] = sys.modules["timm"].__version__
    return versions


def save_model(run_dir: Path, model: torch.nn.Module, card: ModelCard) -> ModelCard:
    """Write model.safetensors and model.json (with the weights' sha256);
    returns the card written."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    raw = save(state)
    atomic_write(Path(run_dir) / MODEL_FILE, raw)
    card = card.replace(sha256=hashlib.sha256(raw).hexdigest())
    atomic_write(Path(run_dir) / META_FILE, card.to_json())
    return card


def read_card(run_dir: Path) -> ModelCard:
    """model.json of a run folder, with a clear error when the folder is not a run."""
    path = Path(run_dir) / META_FILE
    if Path(run_dir).suffix == ".onnx" and Path(run_dir).is_file():
        raise TransferkitError(f"'{run_dir}' is an exported ONNX file, not a run folder: "
                               "predict with it by transferkit.export.OnnxPredictor(path), "
                               "or pass the run folder it came from")
    if not path.is_file():
        raise TransferkitError(
            f"'{run_dir}' is not a transferkit run folder (no {META_FILE}); "
            "pass the --out folder of a finished 'transferkit train'"
        )
    try:
        return ModelCard.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TransferkitError(f"{path} is damaged ({type(e).__name__}: {e}); "
                               "retrain or restore it") from None


def update_card(run_dir: Path, **changes: Any) -> None:
    """Change fields of a run's model.json that do not
    touch its weights (e.g. the data's new place)."""
    atomic_write(Path(run_dir) / META_FILE, read_card(run_dir).replace(**changes).to_json())


def load_model_state(run_dir: Path, card: ModelCard) -> dict[str, torch.Tensor]:
    """The run's weights, checked against the sha256 in model.json."""
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise TransferkitError(f"{path} is missing; the run did not finish saving a model")
    raw = path.read_bytes()
    if not card.sha256:
        log.warning("%s names no sha256 of %s: the weights cannot be checked", META_FILE, path)
    elif hashlib.sha256(raw).hexdigest() != card.sha256:
        raise TransferkitError(
            f"{path} does not match the checksum in {META_FILE}: the file is truncated or was "
            "altered; restore it from a backup or retrain"
        )
    return load_file(str(path))


def save_last(run_dir: Path, state: dict[str, Any]) -> None:
    """The resumable checkpoint: plain tensors and JSON-able values only."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(Path(run_dir) / LAST_FILE, buf.getvalue())


def load_last(run_dir: Path) -> dict[str, Any]:
    """Read last.pt with weights_only=True: a file that would run code is refused."""
    path = Path(run_dir) / LAST_FILE
    if not path.is_file():
        raise TransferkitError(f"nothing to resume in '{run_dir}': no {LAST_FILE}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TransferkitError(f"cannot read {path}: {type(e).__name__}: {e}") from None
