"""Metrics from logits, and the run's report.md with its confusion-matrix and curve pictures."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write


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
    def accuracy(self) -> float:
        return self.metrics["accuracy"]


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Accuracy, top-5, per-class precision/recall/F1 and the confusion matrix (rows: true)."""
    k = len(classes)
    pred = logits.argmax(1)
    confusion = torch.bincount(labels * k + pred, minlength=k * k).view(k, k)
    tp = confusion.diag().double()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    top = min(5, k)  # with fewer than 5 classes, "top5" is top-k over all k (and 1.0)
    return {
        "images": len(labels),
        "accuracy": (pred == labels).double().mean().item(),
        "top5": (logits.topk(top, dim=1).indices == labels[:, None]).any(1).double().mean().item(),
        "topk": top,
        "per_class": [
            {"class": c, "precision": precision[i].item(), "recall": recall[i].item(),
             "f1": f1[i].item(), "support": int(confusion[i].sum())}
            for i, c in enumerate(classes)
        ],
        "confusion": confusion.tolist(),
    }


def write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl, one line per finished epoch, rewritten whole so it always matches last.pt."""
    atomic_write(Path(out) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def measured_on(split, data: str, image_size: int, *, tta: bool = False, note: str = "") -> str:
    """What a figure was measured on: the split, its images, how they were stored and fed to the model."""
    return (f"{split.name} split of {data}, {len(split):,} images" + (f" ({note})" if note else "")
            + f", stored at {split.resolution}, model input {image_size}x{image_size}"
            + (", with its mirror image" if tta else ""))


def top_label(metrics: dict[str, Any]) -> str:
    """'top-5' (or top-k with fewer classes) as a report or the CLI names it."""
    return f"top-{metrics['topk']}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: Path) -> None:
    """Render to memory, then write with the run folder's one atomic writer."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    atomic_write(path, buf.getvalue())


def confusion_png(path: Path, confusion: list[list[int]], classes: list[str], title: str) -> None:
    """Draw the row-normalized confusion matrix with counts."""
    plt = _pyplot()
    m = torch.tensor(confusion, dtype=torch.float64)
    norm = m / m.sum(1, keepdim=True).clamp(min=1)
    k = len(classes)
    side = min(4 + 0.45 * k, 30)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        ax.set_xticks(range(k), classes, rotation=60, ha="right")
        ax.set_yticks(range(k), classes)
        for i in range(k):
            for j in range(k):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    _save_png(fig, path)


def curves_png(path: Path, history: list[dict[str, Any]]) -> None:
    """Training loss and validation accuracy per epoch."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, [h["train_loss"] for h in history], marker="o")
    a.set_xlabel("epoch")
    a.set_title("train loss")
    if any(h.get("val_acc") is not None for h in history):
        b.plot(epochs, [100 * h["val_acc"] for h in history], marker="o", color="tab:green")
    b.set_xlabel("epoch")
    b.set_title("validation accuracy (%)")
    _save_png(fig, path)


def write_report(
    out_dir: Path, metrics: dict[str, Any], *, title: str, measured_on: str, classes: list[str],
    setup: dict[str, Any], history: list[dict[str, Any]] | None = None, name: str = "report",
) -> Path:
    """Write <name>.md (+ <name>_confusion.png, curves.png) and <name>.json; returns the .md path."""
    out_dir = Path(out_dir)
    conf_png = f"{name}_confusion.png"
    confusion_png(out_dir / conf_png, metrics["confusion"], classes, f"{title}: {measured_on}")
    lines = [
        f"# {title}",
        "",
        f"Measured on: **{measured_on}**.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| accuracy | {100 * metrics['accuracy']:.2f}% |",
        f"| {top_label(metrics)} accuracy | {100 * metrics['top5']:.2f}% |",
        f"| images | {metrics['images']:,} |",
        "",
        "## Setup",
        "",
        *[f"- {k}: {v}" for k, v in setup.items()],
        "",
    ]
    if history:
        curves_png(out_dir / "curves.png", history)
        lines += ["## Training", "", "| epoch | train loss | train acc | val acc | lr | seconds |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for h in history:
            val = f"{100 * h['val_acc']:.2f}%" if h.get("val_acc") is not None else "-"
            lines.append(f"| {h['epoch']} | {h['train_loss']:.4f} | {100 * h['train_acc']:.2f}% | "
                         f"{val} | {h['lr']:.2e} | {h['seconds']:.0f} |")
        lines += ["", "![curves](curves.png)", ""]
    lines += ["## Per class", "", "| class | precision | recall | F1 | images |",
              "| --- | --- | --- | --- | --- |"]
    for row in metrics["per_class"]:
        lines.append(f"| {row['class']} | {100 * row['precision']:.1f}% | {100 * row['recall']:.1f}% | "
                     f"{100 * row['f1']:.1f}% | {row['support']} |")
    lines += ["", "## Confusion matrix (rows: true class, columns: predicted)", "",
              f"![confusion matrix]({conf_png})", ""]
    path = out_dir / f"{name}.md"
    atomic_write(path, "\n".join(lines))
    atomic_write(out_dir / f"{name}.json", json.dumps(dict(metrics, measured_on=measured_on), indent=2))
    return path
