"""transferkit: transfer learning for image classification on PyTorch."""

from .config import TrainConfig
from .errors import TransferkitError
from .evaluate import evaluate_run
from .predict import Predictor
from .report import RunResult
from .training.fit import train
from .version import __version__

__all__ = ["Predictor", "RunResult", "TrainConfig", "TransferkitError", "evaluate_run", "train",
           "__version__"]
