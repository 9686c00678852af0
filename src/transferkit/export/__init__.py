"""Export a classifier to ONNX or TorchScript, kept only when it agrees with PyTorch on real images.

The exported graph takes what a deployer has, uint8 RGB images (N, 3, S, S) at the model's input
side, and does the /255, mean and std itself; it returns the logits. What a consumer must still do
(resize the shorter side with the run's interpolation, crop the center) travels in the file as the
run's `Preprocessing` itself (its to_dict), with the class names and the run's `ModelCard` itself
(its to_json): ONNX `metadata_props`, TorchScript `_extra_files`, and export.json. `OnnxPredictor`
reads them back, so it reads and resizes a photo exactly as `Predictor` does for the run folder.
Every export runs the PyTorch model (fp32) and the exported file side by side on held-out images
and keeps the file only when they agree (written with files.atomic_write). Callers use this
module alone:

    run.py             export_run (a run folder), export_predictor (a Predictor); export.json;
                       summary, what the CLI prints of an export
    model.py           export_model: write, run beside PyTorch, keep the file if they agree
    request.py         Target, Int8 and the checks that refuse a request before any work (the
                       opset, the destination: never a run folder's file, --overwrite)
    formats.py         Deployable, and writing it to ONNX or TorchScript
    file_metadata.py   the Preprocessing and ModelCard in the file, its checksum and opset;
                       export.json's records
    runtime.py         onnxruntime sessions; ONNX and PyTorch logits of uint8 model input
    compare.py         the parity check against PyTorch fp32
    int8.py            int8 quantization and its accuracy gate
    onnx_predictor.py  load_onnx (checked against its checksum) and OnnxPredictor: predict with
                       model.onnx
"""

from __future__ import annotations

from .compare import MAX_PROB_DIFF, parity
from .file_metadata import (
    CARD_KEY,
    CHECKSUM_KEY,
    EXPORT_FILE,
    EXTRA_FILE,
    PREPROCESSING_KEY,
    card_of,
    metadata,
    preprocessing_of,
)
from .formats import Deployable
from .model import export_model
from .onnx_predictor import OnnxPredictor, load_onnx
from .request import (
    DEFAULT_OPSET,
    FORMATS,
    INSTALL_HINT,
    MAX_OPSET,
    MIN_OPSET,
    SUFFIX,
    Format,
    Int8,
    Target,
    check_destination,
    require,
)
from .run import default_out, export_predictor, export_run, summary
from .runtime import RUN_BATCH, as_input, onnx_session, run_onnx, run_torch

__all__ = [
    "CARD_KEY", "CHECKSUM_KEY", "DEFAULT_OPSET", "EXPORT_FILE", "EXTRA_FILE", "FORMATS",
    "INSTALL_HINT", "MAX_OPSET", "MAX_PROB_DIFF", "MIN_OPSET", "PREPROCESSING_KEY", "RUN_BATCH",
    "SUFFIX", "Deployable", "Format", "Int8", "OnnxPredictor", "Target", "as_input", "card_of",
    "check_destination", "default_out", "export_model", "export_predictor", "export_run",
    "load_onnx", "metadata", "onnx_session", "parity", "preprocessing_of", "require", "run_onnx",
    "run_torch", "summary",
]
