"""Which images a final evaluation got wrong:
errors.csv (highest loss first) and the top-losses contact sheet."""

from __future__ import annotations

import csv
import io
import math
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.preprocess import Preprocessing
from ..data.splits import Split, multi_hot
from ..files import atomic_write
from . import multilabel
from .plots import drawing, fallback_fonts, pyplot, save_png, wrap

TOP_LOSSES = 25  # tiles on the contact sheet (5 x 5)
COLUMNS = 5
# inches per tile: 220 px at the report's 100 dpi, room for a 29-character line at 8 pt
TILE_IN = 2.2
CAPTION_PT = 8
# errors.csv's columns after the file (or index): one class per image, and multi-label
CSV_COLUMNS = ("true", "predicted", "prob_true", "prob_predicted", "loss")
MULTILABEL_CSV_COLUMNS = ("true", "predicted", "false_positives", "false_negatives", "loss")
MULTILABEL_WRONG = "with a label given wrongly or missed"


def file_names(name: str) -> tuple[str, str]:
    """(errors csv, contact sheet) beside the report `name`:
    errors.csv for report.md, eval-X_errors.csv for eval-X."""
    prefix = "" if name == "report" else f"{name}_"
    return f"{prefix}errors.csv", f"{prefix}top_losses.png"


def error_rows(logits: torch.Tensor, labels: torch.Tensor, split: Split,
               classes: list[str]) -> list[dict[str, Any]]:
    """One row per misclassified image, highest loss
    (cross-entropy of the softmax) first; ties in split order."""
    assert len(logits) == len(labels) == len(split), "logits, labels and the split out of step"
    logp = torch.log_softmax(logits.double(), dim=1)
    pred = logp.argmax(1)
    wrong = torch.nonzero(pred != labels).flatten().tolist()
    rows = []
    for i in wrong:
        t, p = int(labels[i]), int(pred[i])
        rows.append({"index": i, "file": split.files[i] if split.files is not None else None,
                     "true": classes[t], "predicted": classes[p], "prob_true": math.exp(logp[i, t]),
                     "prob_predicted": math.exp(logp[i, p]), "loss": -float(logp[i, t])})
    rows.sort(key=lambda r: (-r["loss"], r["index"]))
    return rows


def multilabel_error_rows(logits: torch.Tensor, labels: torch.Tensor, split: Split,
                          classes: list[str], thresholds: list[float] | None = None
                          ) -> list[dict[str, Any]]:
    """One row per image with a label given wrongly (false positive) or missed (false
    negative) at `thresholds` (0.5 each without), highest loss (binary cross-entropy summed over
    the labels) first; ties in split order. Label names in a cell are joined by ';'."""
    assert len(logits) == len(labels) == len(split), "logits, labels and the split out of step"
    truth = labels.bool().cpu()
    pred = multilabel.predicted(logits, thresholds)

    def named(row: torch.Tensor) -> str:
        return ";".join(classes[j] for j in row.nonzero().flatten().tolist())

    rows = []
    for i in torch.nonzero((pred != truth).any(1)).flatten().tolist():
        rows.append({"index": i, "file": split.files[i] if split.files is not None else None,
                     "true": named(truth[i]), "predicted": named(pred[i]),
                     "false_positives": named(pred[i] & ~truth[i]),
                     "false_negatives": named(~pred[i] & truth[i]),
                     # binary cross-entropy summed over the labels, as training's
                     "loss": F.binary_cross_entropy_with_logits(
                         logits[i].double(), labels[i].double(), reduction="sum").item()})
    rows.sort(key=lambda r: (-r["loss"], r["index"]))
    return rows


def write_errors(out_dir: Path, name: str, logits: torch.Tensor, labels: torch.Tensor, split: Split,
                 classes: list[str], preprocessing: Preprocessing,
                 title: str = "", thresholds: list[float] | None = None) -> dict[str, Any]:
    """Write the errors csv and top-losses sheet of a final evaluation;
    returns what the report links. Multi-label (2-D labels): each image with a label given
    wrongly or missed at `thresholds`."""
    csv_name, sheet_name = file_names(name)
    if multi_hot(labels):
        rows = multilabel_error_rows(logits, labels, split, classes, thresholds)
        columns, caption, wrong = MULTILABEL_CSV_COLUMNS, _labels_caption, MULTILABEL_WRONG
    else:
        rows = error_rows(logits, labels, split, classes)
        columns, caption, wrong = CSV_COLUMNS, _class_caption, "misclassified"
    # a named data set: the image's index in its split
    key = "file" if split.files is not None else "index"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([key, *columns])
    for r in rows:
        w.writerow([r[key], *(f"{r[c]:.6g}" if isinstance(r[c], float) else r[c]
                              for c in columns)])
    atomic_write(Path(out_dir) / csv_name, buf.getvalue())
    tiles = 0
    if rows:
        top = rows[:TOP_LOSSES]
        # a streamed split reads only these files
        stored = split.images[torch.tensor([r["index"] for r in top])]
        tiles = top_losses_png(Path(out_dir) / sheet_name, seen_by_model(stored, preprocessing),
                               top, title=title, errors=len(rows), total=len(split),
                               caption=caption, wrong=wrong)
    return {"csv": csv_name, "top_losses": sheet_name if tiles else None, "errors": len(rows),
            "images": len(split), "tiles": tiles}


def seen_by_model(stored: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """Stored uint8 images (N, C, h, w) as the model saw them,
    resized and cropped but not normalized: (N, 3, S, S)."""
    x = pre.to_input(stored)
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    return (x * std + mean).clamp_(0, 1)


def _fit(text: str, chars: int, lines: int = 2) -> list[str]:
    """`text` in at most `lines` lines of `chars` characters
    (broken between words where it can), the last cut with an ellipsis if it runs over."""
    out = textwrap.wrap(text, chars, break_on_hyphens=False) or [""]
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][:chars - 1] + "…"
    return out


def _pct(p: float) -> str:
    return "<0.1%" if p < 0.001 else f"{p:.1%}" if p < 0.995 else f"{p:.0%}"


def _labelled(label: str, text: str, chars: int) -> list[str]:
    """'true: cat' in at most two lines of `chars` characters after the label."""
    lines = _fit(text, chars)
    return [f"{label:<5} {lines[0]}", *(f"      {s}" for s in lines[1:])]


def _class_caption(r: dict[str, Any], chars: int) -> str:
    """A tile of one class per image: true / predicted / both probabilities."""
    return "\n".join([*_labelled("true:", r["true"], chars),
                      *_labelled("pred:", r["predicted"], chars),
                      f"p(pred) {_pct(r['prob_predicted'])}  p(true) {_pct(r['prob_true'])}"])


def _labels_caption(r: dict[str, Any], chars: int) -> str:
    """A multi-label tile: its true and predicted labels, those given wrongly (FP) and
    missed (FN), the loss."""
    def listed(key: str) -> str:  # "; " lets a long list wrap between its labels
        return "; ".join(r[key].split(";")) if r[key] else "(none)"

    return "\n".join([*_labelled("true:", listed("true"), chars),
                      *_labelled("pred:", listed("predicted"), chars),
                      *(_labelled("FP:", listed("false_positives"), chars)
                        if r["false_positives"] else []),
                      *(_labelled("FN:", listed("false_negatives"), chars)
                        if r["false_negatives"] else []),
                      f"loss {r['loss']:.3g}"])


@drawing
def top_losses_png(path: Path, images: torch.Tensor, rows: list[dict[str, Any]], *, title: str = "",
                   errors: int | None = None, total: int | None = None,
                   caption: Callable[[dict[str, Any], int], str] = _class_caption,
                   wrong: str = "misclassified") -> int:
    """A grid of the highest-loss images, each captioned true / predicted / probabilities
    (`caption`: another caption of a row, in lines of at most the given characters after a
    label); returns the tiles drawn."""
    plt = pyplot()
    n = min(len(rows), len(images))
    cols = min(COLUMNS, n)
    grid_rows = math.ceil(n / cols)
    chars = int(TILE_IN * 72 / (0.62 * CAPTION_PT)) - 7  # after the "true: " / "pred: " labels
    captions = [caption(r, chars) for r in rows[:n]]
    caption_in = max(c.count("\n") + 1 for c in captions) * 1.25 * CAPTION_PT / 72 + 0.1
    width = cols * TILE_IN + 0.3
    head = " — ".join(filter(None, [f"Top losses: the {n} images the model got most wrong", title]))
    sub = (f"{errors:,} of {total:,} images {wrong}; "
           if errors is not None and total else "") + \
        "shown as the model saw them (resized and cropped), highest loss first."
    head_w, sub_w = wrap(head, width - 0.3, 12), wrap(sub, width - 0.3, 9)
    head_in = (1.3 * 12 * (head_w.count("\n") + 1) + 1.3 * 9 * (sub_w.count("\n") + 1)) / 72 + 0.3
    fig = plt.figure(figsize=(width, grid_rows * (TILE_IN + caption_in) + head_in),
                     layout="constrained")
    fig.suptitle(head_w + "\n" + sub_w, fontsize=10)
    for i in range(n):
        ax = fig.add_subplot(grid_rows, cols, i + 1)
        ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(captions[i], fontsize=CAPTION_PT, loc="left",
                     family=["DejaVu Sans Mono", *fallback_fonts()])
    save_png(fig, path, metadata={"tiles": str(n), "grid": f"{grid_rows}x{cols}"})
    return n
