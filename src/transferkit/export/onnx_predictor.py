"""OnnxPredictor: predict with a transferkit model.onnx through onnxruntime, as Predictor does.

It reads the file's Preprocessing and ModelCard back, so it reads and resizes a photo exactly as
`Predictor` does for the run folder. `load_onnx` is the one way a transferkit ONNX file is opened
to answer with (predict, and a server after it): the file is checked against the checksum it
carries before it answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import TransferkitError
from ..predict import Predictor
from ..task import task_of
from .file_metadata import answering, card_of, preprocessing_of, verify
from .runtime import as_input, onnx_session, run_onnx


def load_onnx(path: str | Path) -> tuple[Any, dict[str, str]]:
    """An onnxruntime session of a transferkit ONNX file and its metadata, from one reading of the
    file, checked against the checksum it carries (a file without one is said in one line);
    refused when it holds no transferkit metadata, differs from its checksum or is damaged."""
    path = Path(path)
    if not path.is_file():
        raise TransferkitError(f"no such ONNX file: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TransferkitError(f"cannot read {path} ({e.strerror or e}); check its "
                               "permissions") from None
    session = onnx_session(path, raw)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if "classes" not in meta or "image_size" not in meta:
        raise TransferkitError(f"{path} holds no transferkit metadata (class names, input "
                               "size, preprocessing); predict with a file written by "
                               "'transferkit export RUN', or pass the run folder")
    verify(raw, path)
    return session, meta


class OnnxPredictor(Predictor):
    """A transferkit ONNX file run by onnxruntime, with the Predictor's answers (predict, ...).

    Only the model input (the graph's uint8 images) and the forward pass are its own: reading and
    resizing files (by the Preprocessing the file holds), --tta, top-k and a multi-label model's
    labels at their thresholds are the Predictor's; the classes, temperature, task and thresholds
    are those of the run's ModelCard the file holds.
    """

    # no super().__init__: no torch model
    def __init__(self, path: str | Path, *, tta: bool = False) -> None:
        self.session, meta = load_onnx(path)
        try:
            self.card = card_of(meta)
            self.preprocessing = preprocessing_of(meta)
            if self.card is not None:
                self.classes, self.temperature = self.card.classes, self.card.temperature
                task, self.thresholds = self.card.task, self.card.thresholds
            else:  # a model exported without a run, or a file of an earlier transferkit
                self.classes = list(json.loads(meta["classes"]))
                self.temperature = float(meta.get("temperature", 1.0))
                task, self.thresholds = answering(meta)
            self.task = task_of(task)
        except (ValueError, TypeError, KeyError) as e:
            raise TransferkitError(f"{path}: its transferkit metadata is damaged ({e}); export the "
                                   "run again") from None
        self.metadata = meta
        self.model = None
        self.device = torch.device("cpu")
        self.precision = "fp32"
        self.tta = tta

    def _input(self, stored: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([as_input(self.preprocessing, t[None]) for t in stored])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_onnx(self.session, x.contiguous())
