"""OnnxPredictor: predict with a transferkit model.onnx through onnxruntime, as Predictor does.

It reads the file's Preprocessing and ModelCard back, so it reads and resizes a photo exactly as
`Predictor` does for the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import TransferkitError
from ..predict import Predictor
from .file_metadata import card_of, preprocessing_of
from .runtime import as_input, onnx_session, run_onnx


class OnnxPredictor(Predictor):
    """A transferkit ONNX file run by onnxruntime, with the Predictor's answers (predict, ...).

    Only the model input (the graph's uint8 images) and the forward pass are its own: reading and
    resizing files (by the Preprocessing the file holds), --tta and top-k are the Predictor's;
    the classes and temperature are those of the run's ModelCard the file holds.
    """

    # no super().__init__: no torch model
    def __init__(self, path: str | Path, *, tta: bool = False) -> None:
        path = Path(path)
        if not path.is_file():
            raise TransferkitError(f"no such ONNX file: {path}")
        self.session = onnx_session(path)
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        if "classes" not in meta or "image_size" not in meta:
            raise TransferkitError(f"{path} holds no transferkit metadata (class names, input "
                                   "size, preprocessing); predict with a file written by "
                                   "'transferkit export RUN', or pass the run folder")
        try:
            self.card = card_of(meta)
            self.preprocessing = preprocessing_of(meta)
            if self.card is not None:
                self.classes, self.temperature = self.card.classes, self.card.temperature
            else:  # a model exported without a run, or a file of an earlier transferkit
                self.classes = list(json.loads(meta["classes"]))
                self.temperature = float(meta.get("temperature", 1.0))
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
