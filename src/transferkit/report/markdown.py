"""report.md and report.json, and the report.html beside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import atomic_write
from . import calibration, html, multilabel
from .error_analysis import MULTILABEL_WRONG
from .escape import md_link, md_picture, md_text
from .html import EPOCH_COLUMNS
from .metrics import MATRIX_MAX_CLASSES, TOP_K, confused_pairs, lr_range
from .plots import MAP_PANEL, confusion_png, curves_png, label_ap_png


def write_report(
    out_dir: Path, metrics: dict[str, Any], *, title: str, measured_on: str, classes: list[str],
    setup: dict[str, Any], history: list[dict[str, Any]] | None = None, name: str = "report",
    errors: dict[str, Any] | None = None,
) -> Path:
    """Write <name>.md (+ <name>_confusion.png, curves.png) and <name>.json; returns the .md path.
    Multi-label metrics (metrics["task"]): <name>_label_ap.png instead of the confusion matrix.
    `errors`: what error_analysis.write_errors wrote
    (errors.csv, the top-losses sheet), linked from the report."""
    out_dir = Path(out_dir)
    sections = (_multilabel_sections if metrics.get("task") == "multilabel"
                else _single_label_sections)
    lines, more = sections(out_dir, metrics, title=title, measured_on=measured_on,
                           classes=classes, setup=setup, history=history, name=name,
                           errors=errors)
    path = out_dir / f"{name}.md"
    atomic_write(path, "\n".join(lines))
    atomic_write(out_dir / f"{name}.json", json.dumps(dict(
        metrics, measured_on=measured_on, **more,
        **({"errors": errors} if errors is not None else {})), indent=2))
    sheet = (errors or {}).get("top_losses")
    html.write_html(out_dir, metrics, title=title, measured_on=measured_on, classes=classes,
                    setup=setup, history=history, name=name,
                    extra_pictures={"top losses": out_dir / sheet} if sheet else None)
    return path


def _single_label_sections(out_dir: Path, metrics: dict[str, Any], *, title: str,
                           measured_on: str, classes: list[str], setup: dict[str, Any],
                           history: list[dict[str, Any]] | None, name: str,
                           errors: dict[str, Any] | None) -> tuple[list[str], dict[str, Any]]:
    """report.md's lines of one class per image, and what report.json adds to the metrics."""
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
    return lines, {"most_confused": [{"true": t, "predicted": p, "images": n, "share": share}
                                     for t, p, n, share in pairs]}


def _headline_lines(metrics: dict[str, Any], title: str, measured_on: str,
                    setup: dict[str, Any], figures: list[str] | None = None) -> list[str]:
    """The report's title, its table of headline figures (`figures`: its rows, by default
    those of one class per image) and the Setup section."""
    top5 = metrics.get("top5")
    return [
        f"# {md_text(title)}",
        "",
        f"Measured on: **{md_text(measured_on)}**.",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(figures if figures is not None else [
            f"| accuracy | {100 * metrics['accuracy']:.2f}% |",
            *([] if top5 is None else [f"| top-{TOP_K} accuracy | {100 * top5:.2f}% |"]),
            f"| balanced accuracy (mean recall of the classes) | "
            f"{100 * metrics['balanced_accuracy']:.2f}% |",
            f"| macro-F1 (mean F1 of the classes) | {100 * metrics['macro_f1']:.2f}% |"]),
        f"| images | {metrics['images']:,} |",
        "",
        "## Setup",
        "",
        *[f"- {md_text(k)}: {md_text(v)}" for k, v in setup.items()],
        "",
    ]


def _training_lines(history: list[dict[str, Any]],
                    columns: tuple[tuple[str, str], ...] = EPOCH_COLUMNS) -> list[str]:
    """The epochs' table (`columns`: the figures shown, (column, key)) and the curves picture."""
    lines = ["## Training", "",
             f"| epoch | train loss | {' | '.join(c for c, _ in columns)} | "
             "lr (first → last step) | seconds |",
             "| --- | --- | " + "--- | " * len(columns) + "--- | --- |"]
    for h in history:
        shown = " | ".join(f"{100 * h[k]:.2f}%" if h.get(k) is not None else "-"
                           for _, k in columns)
        lines.append(f"| {h['epoch']} | {h['train_loss']:.4f} | {shown} | "
                     f"{lr_range(h)} | {h['seconds']:.{1 if h['seconds'] < 10 else 0}f} |")
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
    return lines + _errors_lines(errors, "misclassified", "file, true and predicted class, their "
                                 "probabilities, the loss")


def _errors_lines(errors: dict[str, Any] | None, wrong: str, columns: str) -> list[str]:
    """The Errors section: how many images are `wrong`, errors.csv (with its `columns`) and the
    top-losses sheet."""
    if errors is None:
        return []
    lines = ["## Errors", "",
             f"{errors['errors']:,} of {errors['images']:,} images {wrong}; "
             f"{md_link(errors['csv'])} lists each ({columns}), highest loss first.", ""]
    if errors.get("top_losses"):
        lines += [f"The {errors['tiles']} highest losses, as the model saw them:", "",
                  md_picture("top losses", errors["top_losses"]), ""]
    return lines


def _multilabel_sections(out_dir: Path, metrics: dict[str, Any], *, title: str,
                         measured_on: str, classes: list[str], setup: dict[str, Any],
                         history: list[dict[str, Any]] | None, name: str,
                         errors: dict[str, Any] | None) -> tuple[list[str], dict[str, Any]]:
    """report.md's lines of a multi-label evaluation: mAP first, each label's figures and
    threshold, their AP picture, the labels most often given wrongly and missed, the errors."""
    ap_png = f"{name}_label_ap.png"
    label_ap_png(out_dir / ap_png, metrics["per_label"], metrics["map"],
                 title, f"Measured on the {measured_on}.")
    lines = _headline_lines(metrics, title, measured_on, setup, _multilabel_figures(metrics))
    if history:
        curves_png(out_dir / "curves.png", history, MAP_PANEL)
        lines += _training_lines(history, multilabel.EPOCH_COLUMNS)
    lines += ["## Per label", "", multilabel.thresholds_note(metrics), "",
              "| label | AP | precision | recall | F1 | images | threshold |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in metrics["per_label"]:
        lines.append(f"| {md_text(r['label'])} | {_pct(r['ap'], 1)} | {_pct(r['precision'], 1)} | "
                     f"{_pct(r['recall'], 1)} | {_pct(r['f1'], 1)} | {r['support']} | "
                     f"{r['threshold']:.3g} |")
    lines += ["", md_picture("average precision of each label", ap_png), ""]
    given, missed = multilabel.frequent_mistakes(metrics)
    for head, rows, share in (("given wrongly (false positives)", given,
                               "share of the images without it"),
                              ("missed (false negatives)", missed, "share of its images")):
        lines += [f"## Labels most often {head}", "", f"| label | images | {share} |",
                  "| --- | --- | --- |",
                  *[f"| {md_text(c)} | {n} | {100 * part:.1f}% |" for c, n, part in rows],
                  *([] if rows else ["| (none) | 0 | |"]), ""]
    return lines + _errors_lines(
        errors, MULTILABEL_WRONG, "file, true and predicted labels, the "
        "labels given wrongly and those missed, the loss: binary cross-entropy summed over the "
        "labels"), {}


def _multilabel_figures(metrics: dict[str, Any]) -> list[str]:
    """The headline rows of a multi-label evaluation, mAP first."""
    unseen = metrics["labels_without_positives"]
    k = len(metrics["per_label"])
    return [f"| mAP (mean average precision of the labels) | {_pct(metrics['map'])} |",
            f"| micro-F1 (over every image's every label) | {_pct(metrics['micro_f1'])} |",
            f"| macro-F1 (mean F1 of the labels) | {_pct(metrics['macro_f1'])} |",
            f"| exact match (images with every label right) | {_pct(metrics['exact_match'])} |",
            f"| labels | {k}" + (f" ({unseen} without a positive image here: no AP, left out of "
                                  "mAP and macro-F1)" if unseen else "") + " |"]


def _pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"
