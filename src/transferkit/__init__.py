"""transferkit: transfer learning for image classification on PyTorch."""

from __future__ import annotations

import importlib
import typing

from .config import TrainConfig
from .errors import TransferkitError
from .version import __version__

if typing.TYPE_CHECKING:
    from .evaluate import evaluate_run
    from .predict import Predictor
    from .report import RunResult
    from .training.fit import train

__all__ = ["Predictor", "RunResult", "TrainConfig", "TransferkitError", "evaluate_run", "train",
           "__version__"]

# The names that need torch are imported on first use: `transferkit --help` and an argument error
# (the CLI imports this package first) answer without loading torch.
_LAZY = {"evaluate_run": ".evaluate", "Predictor": ".predict", "RunResult": ".report",
         "train": ".training.fit"}


def __getattr__(name: str) -> typing.Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'transferkit' has no attribute '{name}'")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
