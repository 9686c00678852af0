"""The report of a run or an evaluation:
metrics (one class per image, or multi-label), pictures, report.md/.json/.html, calibration,
errors."""

from .markdown import write_report
from .metrics import (
    RunResult,
    accuracy_line,
    classification_metrics,
    lr_range,
    measured_on,
    write_metrics,
)
from .multilabel import multilabel_metrics

__all__ = ["RunResult", "accuracy_line", "classification_metrics", "lr_range", "measured_on",
           "multilabel_metrics", "write_metrics", "write_report"]
