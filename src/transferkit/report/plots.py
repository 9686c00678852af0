"""Every picture of a report, drawn with matplotlib (Agg): confusion, curves, reliability,
multi-label AP."""

from __future__ import annotations

import fnmatch
import functools
import io
import textwrap
import unicodedata
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..files import atomic_write
from .metrics import MATRIX_MAX_CLASSES, confused_pairs

# Fonts for the scripts DejaVu Sans lacks (class and folder names in Chinese, Japanese, Korean,
# Devanagari...), tried glyph by glyph after it, where installed: scripts/setup.sh installs
# Debian's fonts-noto-cjk; without any, such glyphs are boxes, quietly.
FALLBACK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK KR",
                  "Noto Sans Devanagari", "Noto Sans Thai", "Noto Sans Bengali", "Noto Sans Tamil",
                  "Noto Sans Arabic", "Noto Sans Hebrew", "Droid Sans Fallback",
                  "WenQuanYi Micro Hei")
# their files, for a font installed after matplotlib cached its list of fonts
FONT_FILES = ("NotoSansCJK-*", "NotoSans[A-Z]*-Regular.*", "NotoSans[A-Z]*-Bold.*",
              "DroidSansFallback*", "wqy-microhei*")
# a class name in a picture: at most this many character widths (a CJK character counts two);
# the report's tables give it in full
LABEL_WIDTH = 28

Drawn = TypeVar("Drawn")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@functools.cache
def fallback_fonts() -> tuple[str, ...]:
    """The FALLBACK_FONTS installed here."""
    from matplotlib import font_manager

    def known() -> set[str]:
        return {f.name for f in font_manager.fontManager.ttflist}

    if not known() & set(FALLBACK_FONTS):
        for path in font_manager.findSystemFonts():
            if any(fnmatch.fnmatch(Path(path).name, f) for f in FONT_FILES):
                font_manager.fontManager.addfont(path)
    have = known()
    cjk = next((f for f in FALLBACK_FONTS if "CJK" in f and f in have), None)  # one covers all
    return tuple(f for f in FALLBACK_FONTS if f in have and ("CJK" not in f or f == cjk))


def drawing(draw: Callable[..., Drawn]) -> Callable[..., Drawn]:
    """For a function that draws a picture: the fonts of fallback_fonts() after DejaVu Sans, and no
    raw "Glyph missing" warning for a character that none of them has (a box is drawn)."""

    @functools.wraps(draw)
    def drawn(*args: Any, **kwargs: Any) -> Drawn:
        import matplotlib

        pyplot()
        with matplotlib.rc_context({"font.family": ["DejaVu Sans", *fallback_fonts()]}), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
            return draw(*args, **kwargs)

    return drawn


def text_width(text: str) -> int:
    """`text`'s width in characters of a Latin font: a wide (CJK) character counts two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _cut(text: str, width: int, from_end: bool = False) -> str:
    """The longest start (or end) of `text` within `width` character widths."""
    chars = reversed(text) if from_end else iter(text)
    kept, used = [], 0
    for c in chars:
        used += text_width(c)
        if used > width:
            break
        kept.append(c)
    return "".join(reversed(kept) if from_end else kept)


def short_labels(names: list[str], width: int = LABEL_WIDTH) -> list[str]:
    """Names for a picture's axes, each within `width` character widths: a longer one keeps its
    start and end around an ellipsis ('a_very_long_cl…_version_2'); names that would read the
    same get their class number in front."""
    head = (2 * (width - 1)) // 3
    labels = [n if text_width(n) <= width
              else _cut(n, head) + "…" + _cut(n, width - 1 - text_width(_cut(n, head)), True)
              for n in names]
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    return [f"#{i} {label}" if seen[label] > 1 else label for i, label in enumerate(labels)]


def save_png(fig, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Render to memory, then write with the run folder's one atomic writer."""
    buf = io.BytesIO()
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100, metadata=metadata)
    pyplot().close(fig)
    atomic_write(path, buf.getvalue())


def wrap(text: str, width_in: float, fontsize: float) -> str:
    """`text` in lines that fit `width_in` inches at `fontsize` points
    (DejaVu Sans: about 0.6 em a character)."""
    return "\n".join(textwrap.wrap(text, max(12, int(width_in * 72 / (0.62 * fontsize))),
                                   break_long_words=True, break_on_hyphens=False))


def _titles(fig, ax, title: str, subtitle: str, under: float) -> float:
    """A short bold title over the figure and the details over the axes (`under`
    inches wide, where they are centred), both wrapped to fit; returns their
    height in inches (for sizing the figure)."""
    title, subtitle = wrap(title, fig.get_figwidth() - 0.4, 13), wrap(subtitle, under, 9)
    fig.suptitle(title, fontsize=13, fontweight="bold")
    if subtitle:
        ax.set_title(subtitle, fontsize=9, color="0.25")
    return (1.3 * 13 * (title.count("\n") + 1)
            + (1.3 * 9 * (subtitle.count("\n") + 1) if subtitle else 0)) / 72 + 0.3


def _shortened(classes: list[str], labels: list[str]) -> str:
    """The picture's note where a label is shorter than its class name."""
    return (f"Names over {LABEL_WIDTH} characters shortened (…); the report's tables give them "
            "in full." if labels != classes else "")


@drawing
def confusion_png(path: Path, confusion: list[list[int]], classes: list[str], title: str,
                  subtitle: str = "") -> None:
    """The confusion matrix with counts, coloured by share of each true class;
    above MATRIX_MAX_CLASSES classes a bar chart of the most confused pairs instead."""
    if len(classes) > MATRIX_MAX_CLASSES:
        _confused_pairs_png(path, confusion, classes, title, subtitle)
        return
    plt = pyplot()
    m = torch.tensor(confusion, dtype=torch.float64)
    norm = m / m.sum(1, keepdim=True).clamp(min=1)
    k = len(classes)
    labels = short_labels(classes)
    grid = max(3.5, min(0.55 * k, 16.0))  # inches of the matrix itself
    names = 0.09 * max(text_width(c) for c in labels)  # inches of the longest label at 10 pt
    tilt = k > 3 or names > grid / k
    fig, ax = plt.subplots(figsize=(grid + names + 1.0, 1.0), layout="constrained")
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), labels, rotation=60 if tilt else 0, ha="right" if tilt else "center")
    ax.set_yticks(range(k), labels)
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
    top = _titles(fig, ax, title,
                  " ".join(filter(None, [subtitle, "Colour: share of the true class's images.",
                                         _shortened(classes, labels)])),
                  grid + 0.6)
    # matrix, titles, names, axis label
    fig.set_figheight(grid + top + (0.87 * names if tilt else 0.2) + 1.0)
    save_png(fig, path)


def _confused_pairs_png(path: Path, confusion: list[list[int]], classes: list[str], title: str,
                        subtitle: str) -> None:
    """A horizontal bar per (true -> predicted) pair, most frequent at the top."""
    plt = pyplot()
    labels = short_labels(classes)
    pairs = confused_pairs(confusion, labels)
    # inches of the longest label
    names = 0.09 * (max((text_width(t) + text_width(p) for t, p, _, _ in pairs), default=10) + 3)
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
        ax.text(0.5, 0.5, "no image was misclassified", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("images (share of the true class's images)")
    ax.set_ylabel("true → predicted")
    k = len(classes)
    head = (f"The {len(pairs)} most frequent mistakes among {k} classes (their {k}x{k} matrix "
            "would be unreadable; the report's .json holds it)." if pairs
            else f"{k} classes, no mistakes.")
    top = _titles(fig, ax, title,
                  " ".join(filter(None, [subtitle, head, _shortened(classes, labels)])), bars)
    fig.set_figheight(top + 0.3 * max(len(pairs), 3) + 0.9)
    save_png(fig, path)


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


# the right half of curves.png: its title and lines, (legend, the epoch rows' key, colour, style)
ACCURACY_PANEL = ("accuracy (%)", (("train", "train_acc", "tab:blue", "-"),
                                   ("validation", "val_acc", "tab:green", "-")))
# multi-label: a row's train_acc is its exact-match ratio at 0.5 (report.multilabel.EPOCH_COLUMNS)
MAP_PANEL = ("mAP and exact match (%)", (("validation mAP", "val_map", "tab:green", "-"),
                                         ("train exact match", "train_acc", "tab:blue", ":"),
                                         ("validation exact match", "val_exact_match",
                                          "tab:green", "--")))
AP_BARS = 40  # the AP picture of more labels shows the weakest this many (report.json holds all)


@drawing
def curves_png(path: Path, history: list[dict[str, Any]],
               panel: tuple[str, tuple[tuple[str, str, str, str], ...]] = ACCURACY_PANEL) -> None:
    """Train beside validation loss, and train beside validation accuracy (`panel`: another
    set of figures, e.g. MAP_PANEL), per epoch."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    style = {"marker": "o"} if len(epochs) <= 15 else {}
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    losses = [h["train_loss"] for h in history]
    a.plot(epochs, losses, color="tab:blue", label="train", **style)
    val_loss = [(h["epoch"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if val_loss:
        a.plot(*zip(*val_loss), color="tab:green", label="validation", **style)
        losses += [v for _, v in val_loss]
        a.legend(loc="best")
    a.set_ylim(0, 1.1 * max(losses) if max(losses) > 0 else 1)
    a.set_title("loss")
    shown: list[float] = []
    for legend, key, colour, line in panel[1]:
        points = [(h["epoch"], 100 * h[key]) for h in history if h.get(key) is not None]
        if points:
            b.plot(*zip(*points), color=colour, linestyle=line, label=legend, **style)
            shown += [v for _, v in points]
    b.set_ylim(*_accuracy_limits(shown or [0.0, 100.0]))
    b.set_title(panel[0])
    b.legend(loc="lower right")
    if len(epochs) <= 3:  # a few points: their values, rather than a reading off the axis
        for ax, fmt in ((a, "{:.3f}"), (b, "{:.1f}%")):
            for line in ax.get_lines():
                for x, y in zip(line.get_xdata(), line.get_ydata()):
                    ax.annotate(fmt.format(y), (x, y), xytext=(6, 4), textcoords="offset points",
                                fontsize=8, color=line.get_color())
    frozen = [h["epoch"] for h in history if h.get("backbone_frozen")]
    thawed = [h["epoch"] for h in history if h.get("backbone_frozen") is False]
    for ax in (a, b):
        ax.set_xlabel("epoch")
        # one epoch is a point in the middle, not on 0.96-1.04
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        # 'gradual': where the backbone started to train
        if frozen and thawed and min(thawed) > min(frozen):
            ax.axvline(min(thawed) - 0.5, color="0.5", linestyle="--", linewidth=1)
    if frozen and thawed and min(thawed) > min(frozen):
        a.annotate(" backbone unfrozen", (min(thawed) - 0.5, 0.02),
                   xycoords=("data", "axes fraction"), fontsize=8, color="0.4")
    save_png(fig, path)


@drawing
def reliability_png(path: Path, figures: dict[str, Any], title: str) -> None:
    """Accuracy against mean confidence per bin,
    beside the diagonal of a perfectly calibrated model."""
    plt = pyplot()
    rows = figures["reliability"]
    width = 1 / len(rows)
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5.5, 6.2), height_ratios=(3, 1), sharex=True,
                                     layout="constrained")
    ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="perfectly calibrated")
    filled = [r for r in rows if r["images"]]
    ax.bar([r["lo"] for r in filled], [r["accuracy"] for r in filled], width=width, align="edge",
           color="tab:blue", edgecolor="white", label="accuracy in the bin")
    # Where each bar would end if the model were calibrated: the gap to it is what the ECE averages.
    ax.scatter([r["lo"] + width / 2 for r in filled], [r["confidence"] for r in filled],
               color="tab:red", marker="_", s=180, linewidths=2.5, zorder=3,
               label="mean confidence in the bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    scaled = figures["temperature"] != 1.0
    ax.set_title(f"ECE {100 * figures['ece']:.2f}% ({figures['bins']} bins)"
                 + (f", temperature {figures['temperature']:.3g}; "
                    f"before {100 * figures['ece_uncalibrated']:.2f}%" if scaled else ""),
                 fontsize=9, color="0.25")
    fig.suptitle(title, fontsize=12, fontweight="bold")
    counts.bar([r["lo"] for r in rows], [r["images"] for r in rows], width=width, align="edge",
               color="0.6", edgecolor="white")
    counts.set_ylabel("images")
    counts.set_xlabel("top-1 confidence")
    save_png(fig, path)


@drawing
def label_ap_png(path: Path, per_label: list[dict[str, Any]], mean_ap: float | None, title: str,
                 subtitle: str = "") -> int:
    """A horizontal bar per label, its average precision, weakest at the top (the AP_BARS
    weakest of more), the mAP as a line; returns the bars drawn."""
    plt = pyplot()
    labels = short_labels([r["label"] for r in per_label])
    scored = sorted((j for j, r in enumerate(per_label) if r["ap"] is not None),
                    key=lambda j: per_label[j]["ap"])[:AP_BARS]
    rows = list(reversed(scored))  # barh draws the first row at the bottom
    names = 0.09 * (max((text_width(labels[j]) for j in rows), default=10) + 1)
    bars = 6.0
    fig, ax = plt.subplots(figsize=(names + bars + 0.8, 1.0), layout="constrained")
    aps = [100 * per_label[j]["ap"] for j in rows]
    if rows:
        ax.barh(range(len(rows)), aps, color="tab:blue")
        ax.set_yticks(range(len(rows)), [labels[j] for j in rows])
        for y, v in enumerate(aps):
            ax.annotate(f" {v:.1f}%", (v, y), va="center", fontsize=9)
        ax.set_ylim(-0.6, len(rows) - 0.4)
    else:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no label has a positive image", ha="center", va="center",
                transform=ax.transAxes)
    if mean_ap is not None:
        ax.axvline(100 * mean_ap, color="tab:red", linestyle="--", linewidth=1)
    ax.set_xlim(0, 115)
    ax.set_xlabel("average precision (%)")
    k, unseen = len(per_label), [r["label"] for r in per_label if r["ap"] is None]
    head = (f"The {len(rows)} weakest of {k} labels (the report's tables give every label)."
            if len(rows) < k - len(unseen) else "Each label's AP, the weakest at the top.") + (
        "" if mean_ap is None else f" Red dashes: the mAP ({100 * mean_ap:.1f}%), the mean over "
        "every label with a positive image.")
    none = (f"{len(unseen)} without a positive image here, so without an AP: "
            + ", ".join(short_labels(unseen)[:5]) + (" …" if len(unseen) > 5 else "") + "."
            if unseen else "")
    top = _titles(fig, ax, title, " ".join(filter(None, [
        subtitle, head, none, _shortened([r["label"] for r in per_label], labels)])), bars)
    fig.set_figheight(top + 0.3 * max(len(rows), 3) + 0.9)
    save_png(fig, path, metadata={"bars": str(len(rows))})
    return len(rows)
