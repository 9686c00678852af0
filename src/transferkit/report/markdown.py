"""Metrics from logits, and the run's report.md with its confusion-matrix and curve pictures."""

from __future__ import annotations

import io
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import calibration, html_report, runfiles
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


TOP_K = 5  # metrics["top5"]: None with TOP_K classes or fewer, where every image is "in the top 5"
MATRIX_MAX_CLASSES = 30  # above this a full confusion matrix is unreadable: the most confused pairs instead
CONFUSED_PAIRS = 20  # how many pairs that picture and its table show


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Accuracy, top-5 (None with 5 classes or fewer), balanced accuracy and macro-F1 (means over the classes
    present in `labels`), per-class precision/recall/F1, confusion matrix (rows: true)."""
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
    """What a figure was measured on: the split, its images, how they were stored and fed to the model."""
    return (f"{split.name} split of {data}, {len(split):,} images" + (f" ({note})" if note else "")
            + f", stored at {split.resolution}, model input {image_size}x{image_size}"
            + (", with its mirror image" if tta else ""))


def accuracy_line(metrics: dict[str, Any]) -> str:
    """'accuracy 91.20% (top-5 99.10%), balanced accuracy 90.80%, macro-F1 90.75%' as the CLI prints it; top-5
    only where it is not 100% by construction."""
    top5 = metrics.get("top5")
    line = f"accuracy {100 * metrics['accuracy']:.2f}%" + ("" if top5 is None else f" (top-5 {100 * top5:.2f}%)")
    if metrics.get("balanced_accuracy") is not None:  # a report.json written before has neither
        line += (f", balanced accuracy {100 * metrics['balanced_accuracy']:.2f}%, "
                 f"macro-F1 {100 * metrics['macro_f1']:.2f}%")
    return line


def lr_range(row: dict[str, Any], arrow: str = "→") -> str:
    """An epoch's learning rate, first step to last ('1.0e-03 → 5.0e-04'); rows written before hold one `lr`."""
    if "lr_start" not in row:  # the one lr of an older row is the epoch's last
        return "-" if row.get("lr") is None else f"{arrow} {row['lr']:.1e}"
    start, end = row["lr_start"], row["lr_end"]
    if start is None:
        return "-"
    return f"{start:.1e}" if f"{start:.1e}" == f"{end:.1e}" else f"{start:.1e} {arrow} {end:.1e}"


def confused_pairs(confusion: list[list[int]], classes: list[str], n: int = CONFUSED_PAIRS
                   ) -> list[tuple[str, str, int, float]]:
    """The `n` most frequent mistakes: (true class, predicted class, images, share of the true class's images)."""
    m = torch.tensor(confusion, dtype=torch.long)
    support = m.sum(1)
    off = m.clone()
    off.fill_diagonal_(0)
    flat = off.flatten()
    order = sorted(range(len(flat)), key=lambda i: -int(flat[i]))[:n]  # stable: ties keep class order
    k = len(classes)
    return [(classes[i // k], classes[i % k], int(flat[i]), int(flat[i]) / max(1, int(support[i // k])))
            for i in order if flat[i] > 0]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Render to memory, then write with the run folder's one atomic writer."""
    buf = io.BytesIO()
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100, metadata=metadata)
    _pyplot().close(fig)
    atomic_write(path, buf.getvalue())


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """`text` in lines that fit `width_in` inches at `fontsize` points (DejaVu Sans: about 0.6 em a character)."""
    return "\n".join(textwrap.wrap(text, max(12, int(width_in * 72 / (0.62 * fontsize))), break_long_words=True,
                                    break_on_hyphens=False))


def _titles(fig, ax, title: str, subtitle: str, under: float) -> float:
    """A short bold title over the figure and the details over the axes (`under` inches wide, where they are
    centred), both wrapped to fit; returns their height in inches (for sizing the figure)."""
    title, subtitle = _wrap(title, fig.get_figwidth() - 0.4, 13), _wrap(subtitle, under, 9)
    fig.suptitle(title, fontsize=13, fontweight="bold")
    if subtitle:
        ax.set_title(subtitle, fontsize=9, color="0.25")
    return (1.3 * 13 * (title.count("\n") + 1) + (1.3 * 9 * (subtitle.count("\n") + 1) if subtitle else 0)) / 72 + 0.3


def confusion_png(path: Path, confusion: list[list[int]], classes: list[str], title: str, subtitle: str = "") -> None:
    """The confusion matrix with counts, coloured by share of each true class; above MATRIX_MAX_CLASSES classes
    a bar chart of the most confused pairs instead."""
    if len(classes) > MATRIX_MAX_CLASSES:
        _confused_pairs_png(path, confusion, classes, title, subtitle)
        return
    plt = _pyplot()
    m = torch.tensor(confusion, dtype=torch.float64)
    norm = m / m.sum(1, keepdim=True).clamp(min=1)
    k = len(classes)
    grid = max(3.5, min(0.55 * k, 16.0))  # inches of the matrix itself
    names = 0.09 * max(len(c) for c in classes)  # inches of the longest class name at 10 pt
    tilt = k > 3 or names > grid / k
    fig, ax = plt.subplots(figsize=(grid + names + 1.0, 1.0), layout="constrained")
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=60 if tilt else 0, ha="right" if tilt else "center")
    ax.set_yticks(range(k), classes)
    # The counts' size follows the cell: as large as the widest count allows, 6-16 pt.
    cell = grid * 72 / k
    digits = len(str(int(m.max()))) if m.numel() else 1
    size = max(6.0, min(14.0, 0.4 * cell, 0.75 * cell / (0.62 * digits)))
    for i in range(k):
        for j in range(k):
            if m[i, j]:
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=size,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = _titles(fig, ax, title, " ".join(filter(None, [subtitle, "Colour: share of the true class's images."])),
                  grid + 0.6)
    fig.set_figheight(grid + top + (0.87 * names if tilt else 0.2) + 1.0)  # matrix, titles, names, axis label
    _save_png(fig, path)


def _confused_pairs_png(path: Path, confusion: list[list[int]], classes: list[str], title: str, subtitle: str) -> None:
    """A horizontal bar per (true -> predicted) pair, most frequent at the top."""
    plt = _pyplot()
    pairs = confused_pairs(confusion, classes)
    names = 0.09 * (max((len(t) + len(p) for t, p, _, _ in pairs), default=10) + 3)  # inches of the longest label
    bars = 6.0
    fig, ax = plt.subplots(figsize=(names + bars + 0.8, 1.0), layout="constrained")
    if pairs:
        rows = list(reversed(pairs))  # barh draws the first row at the bottom
        ax.barh(range(len(rows)), [n for _, _, n, _ in rows], color="tab:red")
        ax.set_yticks(range(len(rows)), [f"{t} → {p}" for t, p, _, _ in rows])
        for y, (_, _, n, share) in enumerate(rows):
            ax.annotate(f" {n} ({100 * share:.0f}%)", (n, y), va="center", fontsize=9)
        ax.set_xlim(0, 1.2 * pairs[0][2])
        ax.xaxis.get_major_locator().set_params(integer=True)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no image was misclassified", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("images (share of the true class's images)")
    ax.set_ylabel("true → predicted")
    k = len(classes)
    head = (f"The {len(pairs)} most frequent mistakes among {k} classes (their {k}x{k} matrix would be "
            "unreadable; the report's .json holds it)." if pairs else f"{k} classes, no mistakes.")
    top = _titles(fig, ax, title, " ".join(filter(None, [subtitle, head])), bars)
    fig.set_figheight(top + 0.3 * max(len(pairs), 3) + 0.9)
    _save_png(fig, path)


def _accuracy_limits(values: list[float]) -> tuple[float, float]:
    """A y range in % around the values, at least 10 points tall, inside 0-100."""
    lo, hi = min(values), max(values)
    pad = max(2.0, 0.1 * (hi - lo))
    lo, hi = lo - pad, hi + pad
    if hi - lo < 10:
        mid = (lo + hi) / 2
        lo, hi = mid - 5, mid + 5
    if lo < 0:
        lo, hi = 0.0, max(hi - lo, 10.0)
    if hi > 100:
        lo, hi = max(0.0, lo - (hi - 100)), 100.0
    return lo, hi


def curves_png(path: Path, history: list[dict[str, Any]]) -> None:
    """Training loss, and train beside validation accuracy, per epoch."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    style = {"marker": "o"} if len(epochs) <= 15 else {}
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    losses = [h["train_loss"] for h in history]
    a.plot(epochs, losses, color="tab:blue", **style)
    a.set_ylim(0, 1.1 * max(losses) if max(losses) > 0 else 1)
    a.set_title("train loss")
    b.plot(epochs, [100 * h["train_acc"] for h in history], color="tab:blue", label="train", **style)
    shown = [100 * h["train_acc"] for h in history]
    val = [(h["epoch"], 100 * h["val_acc"]) for h in history if h.get("val_acc") is not None]
    if val:
        b.plot(*zip(*val), color="tab:green", label="validation", **style)
        shown += [v for _, v in val]
    b.set_ylim(*_accuracy_limits(shown))
    b.set_title("accuracy (%)")
    b.legend(loc="lower right")
    if len(epochs) <= 3:  # a few points: their values, rather than a reading off the axis
        for ax, fmt in ((a, "{:.3f}"), (b, "{:.1f}%")):
            for line in ax.get_lines():
                for x, y in zip(line.get_xdata(), line.get_ydata()):
                    ax.annotate(fmt.format(y), (x, y), xytext=(6, 4), textcoords="offset points", fontsize=8,
                                color=line.get_color())
    frozen = [h["epoch"] for h in history if h.get("backbone_frozen")]
    thawed = [h["epoch"] for h in history if h.get("backbone_frozen") is False]
    for ax in (a, b):
        ax.set_xlabel("epoch")
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)  # one epoch is a point in the middle, not on 0.96-1.04
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        if frozen and thawed and min(thawed) > min(frozen):  # 'gradual': where the backbone started to train
            ax.axvline(min(thawed) - 0.5, color="0.5", linestyle="--", linewidth=1)
    if frozen and thawed and min(thawed) > min(frozen):
        a.annotate(" backbone unfrozen", (min(thawed) - 0.5, 0.02), xycoords=("data", "axes fraction"), fontsize=8,
                   color="0.4")
    _save_png(fig, path)


def write_report(
    out_dir: Path, metrics: dict[str, Any], *, title: str, measured_on: str, classes: list[str],
    setup: dict[str, Any], history: list[dict[str, Any]] | None = None, name: str = "report",
    errors: dict[str, Any] | None = None,
) -> Path:
    """Write <name>.md (+ <name>_confusion.png, curves.png) and <name>.json; returns the .md path.
    `errors`: what error_analysis.write_errors wrote (errors.csv, the top-losses sheet), linked from the report."""
    out_dir = Path(out_dir)
    conf_png = f"{name}_confusion.png"
    confusion_png(out_dir / conf_png, metrics["confusion"], classes, title, f"Measured on the {measured_on}.")
    top5 = metrics.get("top5")
    lines = [
        f"# {title}",
        "",
        f"Measured on: **{measured_on}**.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| accuracy | {100 * metrics['accuracy']:.2f}% |",
        *([] if top5 is None else [f"| top-{TOP_K} accuracy | {100 * top5:.2f}% |"]),
        f"| balanced accuracy (mean recall of the classes) | {100 * metrics['balanced_accuracy']:.2f}% |",
        f"| macro-F1 (mean F1 of the classes) | {100 * metrics['macro_f1']:.2f}% |",
        f"| images | {metrics['images']:,} |",
        "",
        "## Setup",
        "",
        *[f"- {k}: {v}" for k, v in setup.items()],
        "",
    ]
    if history:
        curves_png(out_dir / "curves.png", history)
        lines += ["## Training", "", "| epoch | train loss | train acc | val acc | lr (first → last step) | seconds |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for h in history:
            val = f"{100 * h['val_acc']:.2f}%" if h.get("val_acc") is not None else "-"
            lines.append(f"| {h['epoch']} | {h['train_loss']:.4f} | {100 * h['train_acc']:.2f}% | "
                         f"{val} | {lr_range(h)} | {h['seconds']:.{1 if h['seconds'] < 10 else 0}f} |")
        lines += ["", "![curves](curves.png)", ""]
    lines += ["## Per class", "", "| class | precision | recall | F1 | images |",
              "| --- | --- | --- | --- | --- |"]
    for row in metrics["per_class"]:
        lines.append(f"| {row['class']} | {100 * row['precision']:.1f}% | {100 * row['recall']:.1f}% | "
                     f"{100 * row['f1']:.1f}% | {row['support']} |")
    pairs = confused_pairs(metrics["confusion"], classes)
    lines += _mistakes_lines(pairs, classes, name, conf_png, errors)
    lines += calibration.report_section(out_dir, metrics, name)
    path = out_dir / f"{name}.md"
    atomic_write(path, "\n".join(lines))
    atomic_write(out_dir / f"{name}.json", json.dumps(dict(
        metrics, measured_on=measured_on, most_confused=[{"true": t, "predicted": p, "images": n, "share": share}
                                                         for t, p, n, share in pairs],
        **({"errors": errors} if errors is not None else {})), indent=2))
    sheet = (errors or {}).get("top_losses")
    html_report.write_html(out_dir, metrics, title=title, measured_on=measured_on, classes=classes, setup=setup,
                           history=history, name=name,
                           extra_pictures={"top losses": out_dir / sheet} if sheet else None)
    return path


def _mistakes_lines(pairs: list[tuple[str, str, int, float]], classes: list[str], name: str, conf_png: str,
                    errors: dict[str, Any] | None) -> list[str]:
    """The report's confusion matrix (or bar chart), most confused pairs both ways, and links to the errors."""
    k = len(classes)
    big = k > MATRIX_MAX_CLASSES
    lines = [] if big else ["", "## Confusion matrix (rows: true class, columns: predicted)", "",
                            f"![confusion matrix]({conf_png})"]
    whole = f"; the whole {k}x{k} matrix is in {name}.json" if big else ""
    lines += ["", f"## Most confused pairs (true → predicted, each direction on its own row{whole})", "",
              "| true → predicted | images | share of the true class |", "| --- | --- | --- |",
              *[f"| {t} → {p} | {n} | {100 * share:.1f}% |" for t, p, n, share in pairs],
              *([] if pairs else ["| (none: no image was misclassified) | 0 | |"]), ""]
    if big:
        lines += [f"![most confused pairs]({conf_png})", ""]
    if errors is not None:
        lines += ["## Errors", "",
                  f"{errors['errors']:,} of {errors['images']:,} images misclassified; "
                  f"[{errors['csv']}]({errors['csv']}) lists each (file, true and predicted class, their "
                  "probabilities, the loss), highest loss first.", ""]
        if errors.get("top_losses"):
            lines += [f"The {errors['tiles']} highest losses, as the model saw them:", "",
                      f"![top losses]({errors['top_losses']})", ""]
    return lines
