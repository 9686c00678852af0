"""What a run measured: classification metrics, the epoch rows, where a figure was measured."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import runfiles
from ..files import atomic_write


@dataclass
class RunResult:
    """What a finished run measured and where it wrote it (what `train` returns)."""

    out_dir: Path
    metrics: dict[str, Any]  # on the test split (or val when the data has no test split)
    measured_on: str
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    main: bool = True  # this process speaks for the job (rank 0 under torchrun)

    @property
    def accuracy(self) -> float | None:
        """Single-label: the accuracy (multi-label runs have none: see metrics["map"])."""
        return self.metrics.get("accuracy")


TOP_K = 5  # metrics["top5"]: None with TOP_K classes or fewer, where every image is "in the top 5"
# above this a full confusion matrix is unreadable: the most confused pairs instead
MATRIX_MAX_CLASSES = 30
CONFUSED_PAIRS = 20  # how many pairs that picture and its table show


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor,
                           classes: list[str]) -> dict[str, Any]:
    """Accuracy, top-5 (None with 5 classes or fewer), balanced accuracy and
    macro-F1 (means over the classes present in `labels`), per-class
    precision/recall/F1, confusion matrix (rows: true)."""
    k = len(classes)
    pred = logits.argmax(1)
    confusion = torch.bincount(labels * k + pred, minlength=k * k).view(k, k)
    tp = confusion.diag().double()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    present = confusion.sum(1) > 0  # a class with no image here has no recall to average
    top5 = ((logits.topk(TOP_K, dim=1).indices == labels[:, None]).any(1).double().mean().item()
            if k > TOP_K else None)
    return {
        "images": len(labels),
        "accuracy": (pred == labels).double().mean().item(),
        "top5": top5,
        "balanced_accuracy": recall[present].mean().item() if present.any() else 0.0,
        "macro_f1": f1[present].mean().item() if present.any() else 0.0,
        "per_class": [
            {"class": c, "precision": precision[i].item(), "recall": recall[i].item(),
             "f1": f1[i].item(), "support": int(confusion[i].sum())}
            for i, c in enumerate(classes)
        ],
        "confusion": confusion.tolist(),
    }


def write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl, one line per finished epoch, rewritten whole so it always matches last.pt."""
    atomic_write(Path(out) / runfiles.METRICS, "".join(json.dumps(r) + "\n" for r in history))


def measured_on(split, data: str, image_size: int, *, tta: bool = False, note: str = "") -> str:
    """What a figure was measured on: the split, its images,
    how they were stored and fed to the model."""
    return (f"{split.name} split of {data}, {len(split):,} images" + (f" ({note})" if note else "")
            + f", stored at {split.resolution}, model input {image_size}x{image_size}"
            + (", with its mirror image" if tta else ""))


def accuracy_line(metrics: dict[str, Any]) -> str:
    """'accuracy 91.20% (top-5 99.10%), balanced accuracy 90.80%, macro-F1 90.75%' as the CLI
    prints it; top-5 only where it is not 100% by construction. Multi-label: mAP first."""
    if metrics.get("task") == "multilabel":
        from .multilabel import figures_line
        return figures_line(metrics)
    top5 = metrics.get("top5")
    line = f"accuracy {100 * metrics['accuracy']:.2f}%" + (
        "" if top5 is None else f" (top-5 {100 * top5:.2f}%)")
    if metrics.get("balanced_accuracy") is not None:  # a report.json written before has neither
        line += (f", balanced accuracy {100 * metrics['balanced_accuracy']:.2f}%, "
                 f"macro-F1 {100 * metrics['macro_f1']:.2f}%")
    return line


def lr_range(row: dict[str, Any], arrow: str = "→") -> str:
    """An epoch's learning rate, first step to last ('1.0e-03 → 5.0e-04');
    rows written before hold one `lr`."""
    if "lr_start" not in row:  # the one lr of an older row is the epoch's last
        return "-" if row.get("lr") is None else f"{arrow} {row['lr']:.1e}"
    start, end = row["lr_start"], row["lr_end"]
    if start is None:
        return "-"
    return f"{start:.1e}" if f"{start:.1e}" == f"{end:.1e}" else f"{start:.1e} {arrow} {end:.1e}"


def confused_pairs(confusion: list[list[int]], classes: list[str], n: int = CONFUSED_PAIRS
                   ) -> list[tuple[str, str, int, float]]:
    """The `n` most frequent mistakes:
    (true class, predicted class, images, share of the true class's images)."""
    m = torch.tensor(confusion, dtype=torch.long)
    support = m.sum(1)
    off = m.clone()
    off.fill_diagonal_(0)
    flat = off.flatten()
    # stable: ties keep class order
    order = sorted(range(len(flat)), key=lambda i: -int(flat[i]))[:n]
    k = len(classes)
    return [(classes[i // k], classes[i % k], int(flat[i]),
             int(flat[i]) / max(1, int(support[i // k]))) for i in order if flat[i] > 0]
