"""<name>.html beside <name>.md: the same report as one
self-contained page (pictures inlined, no external files)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from ..files import atomic_write
from . import calibration, multilabel
from .escape import html_text
from .metrics import MATRIX_MAX_CLASSES, confused_pairs, lr_range

WEAKEST_FIRST = "f1"  # the per-class table opens with the classes the model does worst on
PAIRS_SHOWN = 10
# drawn by their own sections, not as generic tables
KNOWN_KEYS = {"per_class", "confusion", "calibration", "per_label"}
# the epoch rows' figures the Training table shows, (column, key): multilabel.EPOCH_COLUMNS there
EPOCH_COLUMNS = (("train acc", "train_acc"), ("val acc", "val_acc"))

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; \
margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } \
h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.measured { color: #555; }
.headline { display: flex; flex-wrap: wrap; gap: 1em; margin: 1em 0; }
.figure { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1em; min-width: 9em; }
.figure .value { font-size: 1.6em; font-weight: 600; } \
.figure .label { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0; } \
th, td { border: 1px solid #ddd; padding: 0.25em 0.7em; }
th { background: #f4f4f4; text-align: left; } \
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; margin: 0.6em 0; }
"""


def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _png(path: Path, alt: str) -> str:
    """An <img> holding the picture itself as a data URI, so the page needs no other file."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html_text(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html_text(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{html_text(v)}</td>' if i in numeric
                                    else f"<td>{html_text(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _headline(metrics: dict[str, Any]) -> str:
    """The figures a reader looks for first, as large numbers."""
    figures = [("accuracy", _pct(metrics["accuracy"]))]
    for key, label in (("top5", "top-5 accuracy"), ("balanced_accuracy", "balanced accuracy"),
                       ("macro_f1", "macro-F1")):
        if isinstance(metrics.get(key), (int, float)):
            figures.append((label, _pct(metrics[key])))
    cal = metrics.get("calibration")
    if cal:
        figures.append((f"ECE ({cal['bins']} bins)", _pct(cal["ece"])))
    figures.append(("images", f"{metrics['images']:,}"))
    return _figures(figures)


def _figures(figures: list[tuple[str, str]]) -> str:
    """(label, value) pairs as large numbers."""
    return '<div class="headline">' + "".join(
        f'<div class="figure"><div class="value">{html_text(v)}</div>'
        f'<div class="label">{html_text(k)}</div></div>'
        for k, v in figures) + "</div>"


def _training(out_dir: Path, history: list[dict[str, Any]],
              columns: tuple[tuple[str, str], ...] = EPOCH_COLUMNS) -> str:
    parts = ["<h2>Training</h2>"]
    if (out_dir / "curves.png").is_file():
        parts.append(_png(out_dir / "curves.png", "training curves"))
    rows = [[h["epoch"], f"{h['train_loss']:.4f}", *(_pct(h.get(k)) for _, k in columns),
             lr_range(h), f"{h.get('seconds', 0):.1f}"] for h in history]
    k = len(columns)
    parts.append(_table(["epoch", "train loss", *(c for c, _ in columns),
                         "lr (first → last step)", "seconds"], rows,
                        {0, 1, *range(2, 2 + k), 3 + k}))
    return "".join(parts)


def _per_class(metrics: dict[str, Any]) -> str:
    # stable: ties in class order
    rows = sorted(metrics["per_class"], key=lambda r: (r[WEAKEST_FIRST], r["recall"]))
    return ("<h2>Per class (weakest first, by F1)</h2>"
            + _table(["class", "precision", "recall", "F1", "images"],
                     [[r["class"], _pct(r["precision"], 1), _pct(r["recall"], 1),
                       _pct(r["f1"], 1), r["support"]] for r in rows], {1, 2, 3, 4}))


def _confusion(out_dir: Path, metrics: dict[str, Any], classes: list[str], name: str) -> str:
    # above, the picture is a bar chart of the most confused pairs
    whole = len(classes) <= MATRIX_MAX_CLASSES
    parts = ["<h2>" + ("Confusion matrix (rows: true class, columns: predicted)" if whole else
                       f"The most frequent mistakes (the whole {len(classes)}x{len(classes)} "
                       f"matrix is in {html_text(name)}.json)") + "</h2>"]
    if (out_dir / f"{name}_confusion.png").is_file():
        parts.append(_png(out_dir / f"{name}_confusion.png", "confusion matrix"))
    pairs = confused_pairs(metrics["confusion"], classes, PAIRS_SHOWN)
    parts.append("<h2>Most confused pairs</h2>")
    parts.append(_table(["true → predicted", "images", "share of the true class"],
                        [[f"{t} → {p}", n, _pct(share, 1)] for t, p, n, share in pairs], {1, 2})
                 if pairs else "<p>No image was misclassified.</p>")
    return "".join(parts)


def _calibration(out_dir: Path, metrics: dict[str, Any], name: str) -> str:
    cal = metrics.get("calibration")
    if not cal:
        return ""
    t = cal["temperature"]
    rows = ([["before (temperature 1)", _pct(cal["ece_uncalibrated"]),
              f"{cal['nll_uncalibrated']:.4f}"],
             [f"after (temperature {t:.4g}, fitted on the validation split)", _pct(cal["ece"]),
              f"{cal['nll']:.4f}"]]
            if t != 1.0 else [[calibration.uncalibrated_label(cal),
                               _pct(cal["ece"]), f"{cal['nll']:.4f}"]])
    parts = ["<h2>Calibration</h2>",
             f"<p>Expected calibration error over {cal['bins']} equal-width bins of top-1 "
             "confidence, and the negative log-likelihood (lower is better for both).</p>",
             _table(["", "ECE", "NLL"], rows, {1, 2}),
             f"<p>--calibrate: {html_text(cal['note'])}.</p>" if cal.get("note") else ""]
    if (out_dir / f"{name}_reliability.png").is_file():
        parts.append(_png(out_dir / f"{name}_reliability.png", "reliability diagram"))
    return "".join(parts)


def _other_tables(metrics: dict[str, Any]) -> str:
    """Any further list of records in the metrics
    (e.g. added by later sections of report.md), as a table."""
    parts = []
    for key, value in metrics.items():
        if key in KNOWN_KEYS or not (isinstance(value, list) and value
                                     and all(isinstance(r, dict) for r in value)):
            continue
        header = list(dict.fromkeys(k for r in value for k in r))
        parts.append(f"<h2>{html_text(key.replace('_', ' ').capitalize())}</h2>"
                     + _table(header, [[("-" if r.get(k) is None else r.get(k)) for k in header]
                                       for r in value]))
    return "".join(parts)


def _other_pictures(out_dir: Path, name: str, shown: set[str],
                    extra: dict[str, Path] | None) -> str:
    """Pictures of this report that no section above drew
    (e.g. the top-losses sheet), titled by their name."""
    found = {p.stem[len(name) + 1:].replace("_", " ").replace("-", " "): p
             for p in sorted(out_dir.glob(f"{name}_*.png")) if p.name not in shown}
    found.update(extra or {})
    return "".join(f"<h2>{html_text(title.capitalize())}</h2>" + _png(path, title)
                   for title, path in found.items() if Path(path).is_file())


def write_html(out_dir: Path, metrics: dict[str, Any], *, title: str, measured_on: str,
               classes: list[str], setup: dict[str, Any],
               history: list[dict[str, Any]] | None = None, name: str = "report",
               extra_pictures: dict[str, Path] | None = None) -> Path:
    """Write <name>.html: headline figures, curves, per-class table (weakest
    first), confusion matrix, most confused pairs, calibration, the other
    pictures of this report, and the settings; returns its path. Multi-label metrics
    (metrics["task"]): mAP first, the per-label table, AP bars and most frequent mistakes."""
    out_dir = Path(out_dir)
    sections = (_multilabel_sections if metrics.get("task") == "multilabel"
                else _single_label_sections)
    body = [f"<h1>{html_text(title)}</h1>",
            f'<p class="measured">Measured on: <strong>{html_text(measured_on)}</strong>.</p>',
            *sections(out_dir, metrics, classes, history, name, extra_pictures),
            "<h2>Settings</h2>" + _table(["setting", "value"], [[k, v] for k, v in setup.items()])]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html_text(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(filter(None, body)) + "\n</body>\n</html>\n")
    path = out_dir / f"{name}.html"
    atomic_write(path, page)
    return path


def _single_label_sections(out_dir: Path, metrics: dict[str, Any], classes: list[str],
                           history: list[dict[str, Any]] | None, name: str,
                           extra_pictures: dict[str, Path] | None) -> list[str]:
    shown = {f"{name}_confusion.png", f"{name}_reliability.png"}
    return [_headline(metrics),
            _training(out_dir, history) if history else "",
            _per_class(metrics),
            _confusion(out_dir, metrics, classes, name),
            _other_pictures(out_dir, name, shown, extra_pictures),
            _other_tables(metrics),
            _calibration(out_dir, metrics, name)]


def _multilabel_sections(out_dir: Path, metrics: dict[str, Any], classes: list[str],
                         history: list[dict[str, Any]] | None, name: str,
                         extra_pictures: dict[str, Path] | None) -> list[str]:
    """A multi-label report: mAP first, the per-label table (weakest AP first) and AP bars,
    the labels most often given wrongly and missed, the top-losses sheet."""
    figures = [("mAP", _pct(metrics["map"])), ("micro-F1", _pct(metrics["micro_f1"])),
               ("macro-F1", _pct(metrics["macro_f1"])),
               ("exact match", _pct(metrics["exact_match"])),
               ("images", f"{metrics['images']:,}"), ("labels", f"{len(classes):,}")]
    ap_png = out_dir / f"{name}_label_ap.png"
    return [_figures(figures),
            _training(out_dir, history, multilabel.EPOCH_COLUMNS) if history else "",
            _per_label(metrics),
            _png(ap_png, "average precision of each label") if ap_png.is_file() else "",
            _label_mistakes(metrics),
            _other_pictures(out_dir, name, {ap_png.name}, extra_pictures),
            _other_tables(metrics)]


def _per_label(metrics: dict[str, Any]) -> str:
    # stable: ties in label order; labels without a positive image (no AP) last
    rows = sorted(metrics["per_label"], key=lambda r: (r["ap"] is None, r["ap"] or 0, r["f1"]))
    return ("<h2>Per label (weakest first, by average precision)</h2>"
            f"<p>{html_text(multilabel.thresholds_note(metrics))}</p>"
            + _table(["label", "AP", "precision", "recall", "F1", "images", "threshold"],
                     [[r["label"], _pct(r["ap"], 1), _pct(r["precision"], 1),
                       _pct(r["recall"], 1), _pct(r["f1"], 1), r["support"],
                       f"{r['threshold']:.3g}"] for r in rows], {1, 2, 3, 4, 5, 6}))


def _label_mistakes(metrics: dict[str, Any]) -> str:
    given, missed = multilabel.frequent_mistakes(metrics)
    parts = []
    for head, rows, share in (("given wrongly (false positives)", given,
                               "share of the images without it"),
                              ("missed (false negatives)", missed, "share of its images")):
        parts.append(f"<h2>Labels most often {head}</h2>"
                     + (_table(["label", "images", share],
                               [[c, n, _pct(part, 1)] for c, n, part in rows], {1, 2})
                        if rows else "<p>None.</p>"))
    return "".join(parts)
