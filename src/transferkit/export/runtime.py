"""Running a model on uint8 model input: onnxruntime sessions, ONNX and PyTorch logits in batches.

`as_input` makes that input from stored images; `run_onnx` and `run_torch` give fp32 logits on
the CPU, a fixed batch padded with the last image.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.preprocess import Preprocessing, upsample
from ..errors import TransferkitError
from .formats import first_line
from .request import require

RUN_BATCH = 32  # images per call when running either model over the check images


def as_input(pre: Preprocessing, images: torch.Tensor) -> torch.Tensor:
    """Stored uint8 images (N, 1 or 3, h, w) as the exported graph's input: uint8 (N, 3, S, S)."""
    if images.shape[-2:] != (pre.image_size, pre.image_size):
        images = upsample(images, pre.image_size)
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    return images.contiguous()


def onnx_session(path: Path, raw: bytes | None = None) -> Any:
    """An onnxruntime CPU session of `path` (of `raw`, its bytes already read, where given), or a
    clear error for a file that is no whole model."""
    require("onnxruntime")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path) if raw is None else raw, opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        raise TransferkitError(f"{path} is not a readable ONNX model ({first_line(e)}): the "
                               "file is truncated or damaged; export it again with 'transferkit "
                               "export RUN'") from None


def _fixed_batch(session: Any) -> int | None:
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) else None


def run_onnx(session: Any, images: torch.Tensor) -> torch.Tensor:
    """fp32 logits of uint8 model input through onnxruntime (a fixed batch: the last one padded)."""
    fixed = _fixed_batch(session)
    step = fixed or RUN_BATCH
    name = session.get_inputs()[0].name
    out = []
    for start in range(0, len(images), step):
        chunk = images[start:start + step].numpy()
        n = len(chunk)
        if fixed and n < fixed:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
        logits = session.run(None, {name: chunk})[0][:n]
        out.append(torch.from_numpy(logits.astype(np.float32)))
    return torch.cat(out)


@torch.no_grad()
def run_torch(module: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
              batch: int | None = None) -> torch.Tensor:
    """fp32 logits of uint8 model input through a PyTorch module (eager or TorchScript), on CPU."""
    step = batch or RUN_BATCH
    out = []
    for start in range(0, len(images), step):
        chunk = images[start:start + step]
        n = len(chunk)
        if batch and n < batch:
            chunk = torch.cat([chunk, chunk[-1:].expand(batch - n, -1, -1, -1)])
        out.append(module(chunk)[:n].float())
    return torch.cat(out)
