"""transferkit: transfer learning for image classification on PyTorch."""

__version__ = "0.1.0"

from .config import TrainConfig
from .errors import TransferkitError
from .fit import train
from .predict import Predictor, evaluate_run
from .report import RunResult

__all__ = ["Predictor", "RunResult", "TrainConfig", "TransferkitError", "evaluate_run", "train", "__version__"]
