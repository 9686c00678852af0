"""report.md and report.json, and the report.html beside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import atomic_write
from . import calibration, html
from .escape import md_link, md_picture, md_text
from .metrics import MATRIX_MAX_CLASSES, TOP_K, confused_pairs, lr_range
from .plots import confusion_png, curves_png


def write_report(
    out_dir: Path, metrics: dict[str, Any], *, title: str, measured_on: str, classes: list[str],
    setup: dict[str, Any], history: list[dict[str, Any]] | None = None, name: str = "report",
    errors: dict[str, Any] | None = None,
) -> Path:
    """Write <name>.md (+ <name>_confusion.png, curves.png) and <name>.json; returns the .md path.
    `errors`: what error_analysis.write_errors wrote
    (errors.csv, the top-losses sheet), linked from the report."""
    out_dir = Path(out_dir)
    conf_png = f"{name}_confusion.png"
    confusion_png(out_dir / conf_png, metrics["confusion"], classes, title,
                  f"Measured on the {measured_on}.")
    lines = _headline_lines(metrics, title, measured_on, setup)
    if history:
        curves_png(out_dir / "curves.png", history)
        lines += _training_lines(history)
    lines += ["## Per class", "", "| class | precision | recall | F1 | images |",
              "| --- | --- | --- | --- | --- |"]
    for row in metrics["per_class"]:
        lines.append(f"| {md_text(row['class'])} | {100 * row['precision']:.1f}% | "
                     f"{100 * row['recall']:.1f}% | {100 * row['f1']:.1f}% | {row['support']} |")
    pairs = confused_pairs(metrics["confusion"], classes)
    lines += _mistakes_lines(pairs, classes, name, conf_png, errors)
    lines += calibration.report_section(out_dir, metrics, name)
    path = out_dir / f"{name}.md"
    atomic_write(path, "\n".join(lines))
    atomic_write(out_dir / f"{name}.json", json.dumps(dict(
        metrics, measured_on=measured_on,
        most_confused=[{"true": t, "predicted": p, "images": n, "share": share}
                       for t, p, n, share in pairs],
        **({"errors": errors} if errors is not None else {})), indent=2))
    sheet = (errors or {}).get("top_losses")
    html.write_html(out_dir, metrics, title=title, measured_on=measured_on, classes=classes,
                    setup=setup, history=history, name=name,
                    extra_pictures={"top losses": out_dir / sheet} if sheet else None)
    return path


def _headline_lines(metrics: dict[str, Any], title: str, measured_on: str,
                    setup: dict[str, Any]) -> list[str]:
    """The report's title, its table of headline figures and the Setup section."""
    top5 = metrics.get("top5")
    return [
        f"# {md_text(title)}",
        "",
        f"Measured on: **{md_text(measured_on)}**.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| accuracy | {100 * metrics['accuracy']:.2f}% |",
        *([] if top5 is None else [f"| top-{TOP_K} accuracy | {100 * top5:.2f}% |"]),
        f"| balanced accuracy (mean recall of the classes) | "
        f"{100 * metrics['balanced_accuracy']:.2f}% |",
        f"| macro-F1 (mean F1 of the classes) | {100 * metrics['macro_f1']:.2f}% |",
        f"| images | {metrics['images']:,} |",
        "",
        "## Setup",
        "",
        *[f"- {md_text(k)}: {md_text(v)}" for k, v in setup.items()],
        "",
    ]


def _training_lines(history: list[dict[str, Any]]) -> list[str]:
    """The epochs' table and the curves picture."""
    lines = ["## Training", "",
             "| epoch | train loss | train acc | val acc | lr (first → last step) | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for h in history:
        val = f"{100 * h['val_acc']:.2f}%" if h.get("val_acc") is not None else "-"
        lines.append(f"| {h['epoch']} | {h['train_loss']:.4f} | {100 * h['train_acc']:.2f}% | "
                     f"{val} | {lr_range(h)} | {h['seconds']:.{1 if h['seconds'] < 10 else 0}f} |")
    return lines + ["", md_picture("curves", "curves.png"), ""]


def _mistakes_lines(pairs: list[tuple[str, str, int, float]], classes: list[str], name: str,
                    conf_png: str, errors: dict[str, Any] | None) -> list[str]:
    """The report's confusion matrix (or bar chart),
    most confused pairs both ways, and links to the errors."""
    k = len(classes)
    big = k > MATRIX_MAX_CLASSES
    lines = [] if big else ["", "## Confusion matrix (rows: true class, columns: predicted)", "",
                            md_picture("confusion matrix", conf_png)]
    whole = f"; the whole {k}x{k} matrix is in {md_text(name)}.json" if big else ""
    lines += ["", "## Most confused pairs (true → predicted, each direction on its own "
              f"row{whole})", "",
              "| true → predicted | images | share of the true class |", "| --- | --- | --- |",
              *[f"| {md_text(t)} → {md_text(p)} | {n} | {100 * share:.1f}% |"
                for t, p, n, share in pairs],
              *([] if pairs else ["| (none: no image was misclassified) | 0 | |"]), ""]
    if big:
        lines += [md_picture("most confused pairs", conf_png), ""]
    if errors is not None:
        lines += ["## Errors", "",
                  f"{errors['errors']:,} of {errors['images']:,} images misclassified; "
                  f"{md_link(errors['csv'])} lists each (file, true and predicted "
                  "class, their probabilities, the loss), highest loss first.", ""]
        if errors.get("top_losses"):
            lines += [f"The {errors['tiles']} highest losses, as the model saw them:", "",
                      md_picture("top losses", errors["top_losses"]), ""]
    return lines
