"""Multi-label reports (issue 28): report.md/json/html lead with mAP and give every label's figures and threshold,
errors.csv names each image's wrongly given and missed labels (highest loss first), the HTML shows AP bars, the
most frequent mistakes and the top-loss sheet; names from the data stay text."""

from __future__ import annotations

import csv
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferkit.data.preprocess import Preprocessing
from transferkit.data.splits import Split
from transferkit.report import error_analysis, plots, write_report
from transferkit.report.error_analysis import write_errors
from transferkit.task import task_of

CLASSES = ["dog", "car", "tree"]
# 4 images: {dog, car}, {dog}, {car, tree}, {} -- and scores (logits) worked out by hand:
# dog ranks img0 (+), img2 (-), img1 (+): AP = (1 + 2/3) / 2; car ranks both positives first: AP 1;
# tree ranks img3 (-) over img2 (+): AP 1/2. mAP = 7/9 = 77.78%.
# At 0.5 (logit 0): dog given to img2 wrongly and missed on img1, tree given to img3 wrongly; img0 right.
LABELS = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 1], [0, 0, 0]])
LOGITS = torch.tensor([[3.0, 2.0, -2.0], [-1.0, -3.0, -2.0], [1.0, 2.5, 0.5], [-2.0, -1.0, 1.0]])
HOSTILE = '<img src=x onerror="alert(1)">|*a*'


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _bce(i: int) -> float:
    """Image i's binary cross-entropy summed over its labels, by hand."""
    return sum(_softplus(-x) if y else _softplus(x) for x, y in zip(LOGITS[i].tolist(), LABELS[i].tolist()))


def _metrics(classes=CLASSES, logits=LOGITS, labels=LABELS, thresholds=None, chosen_on="validation"):
    m = task_of("multilabel").metrics(logits, labels, classes, thresholds)
    m["thresholds_chosen_on"] = chosen_on  # as fit's final evaluation records it
    return m


def _split() -> Split:
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return Split("test", pixels, LABELS, [f"img{i}.png" for i in range(4)])


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _history() -> list[dict]:
    """Epoch rows as a multi-label run writes them to metrics.jsonl: no val_acc."""
    return [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.1 * e, "val_map": 0.5 + 0.1 * e, "val_micro_f1": 0.5,
             "val_macro_f1": 0.4, "val_exact_match": 0.05 * e, "val_loss": 0.9 / e, "lr_start": 1e-3, "lr_end": 5e-4,
             "seconds": 4.0} for e in (1, 2, 3)]


def _report(tmp_path: Path, metrics: dict, classes=CLASSES, history=None, errors=None) -> tuple[str, str, dict]:
    write_report(tmp_path, metrics, title="resnet18 on labels.csv", measured_on="test split of labels.csv",
                 classes=classes, setup={"model": "resnet18"}, history=history, errors=errors)
    return ((tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text(),
            json.loads((tmp_path / "report.json").read_text()))


def _md_table(md: str, header: str) -> list[list[str]]:
    """The cells of the Markdown table whose header row starts with `header`."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_report_md_leads_with_map_and_gives_each_labels_figures_and_threshold(tmp_path):
    thresholds = [0.5, 0.62, 0.3]
    md, _, saved = _report(tmp_path, _metrics(thresholds=thresholds))
    headline = _md_table(md, "| metric | value |")
    assert headline[0] == ["mAP (mean average precision of the labels)", "77.78%"]
    figures = dict(headline)
    assert figures["micro-F1 (over every image's every label)"] == "72.73%"  # 2TP / (2TP + FP + FN) = 8 / 11
    assert figures["exact match (images with every label right)"] == "25.00%"
    assert figures["images"] == "4"
    per_label = _md_table(md, "| label | AP |")
    assert [r[0] for r in per_label] == CLASSES
    assert per_label[0][:2] == ["dog", "83.3%"] and per_label[1][1] == "100.0%" and per_label[2][1] == "50.0%"
    assert [r[-1] for r in per_label] == ["0.5", "0.62", "0.3"]
    assert [r[-2] for r in per_label] == ["2", "2", "1"]  # images that show each label
    assert "chosen on the validation split to maximise its F1" in md
    assert saved["map"] == pytest.approx(7 / 9) and saved["task"] == "multilabel"
    assert [r["threshold"] for r in saved["per_label"]] == pytest.approx(thresholds)
    assert "accuracy" not in md.lower().split("## setup")[0]  # no single-label figure heads the report


def test_without_a_validation_split_the_report_says_every_threshold_is_one_half(tmp_path):
    md, html, _ = _report(tmp_path, _metrics(chosen_on=None))
    sentence = "No validation split to choose them on: every label's decision threshold is 0.5."
    assert sentence in md and sentence.replace("'", "&#x27;") in html
    assert "chosen on the validation split" not in md


def test_errors_csv_names_each_images_wrong_labels_highest_loss_first(tmp_path):
    info = write_errors(tmp_path, "report", LOGITS, LABELS, _split(), CLASSES, Preprocessing(16, 16), title="t")
    rows = _rows(tmp_path / "errors.csv")
    assert [r["file"] for r in rows] == ["img2.png", "img3.png", "img1.png"]  # by loss, not split order
    assert [(r["false_positives"], r["false_negatives"]) for r in rows] == [("dog", ""), ("tree", ""), ("", "dog")]
    assert [(r["true"], r["predicted"]) for r in rows] == [("car;tree", "dog;car;tree"), ("", "tree"), ("dog", "")]
    assert [float(r["loss"]) for r in rows] == pytest.approx([_bce(2), _bce(3), _bce(1)], rel=1e-5)
    assert info["errors"] == 3 and info["images"] == 4 and info["tiles"] == 3
    with Image.open(tmp_path / "top_losses.png") as im:
        assert im.text["tiles"] == "3"


def test_errors_follow_each_labels_threshold(tmp_path):
    """car's score on img0 is sigmoid(2) = 0.88: under a 0.9 threshold car is missed there; tree at 0.75 is no
    longer given to img3 (sigmoid(1) = 0.73), but is then missed on img2."""
    write_errors(tmp_path, "report", LOGITS, LABELS, _split(), CLASSES, Preprocessing(16, 16),
                 thresholds=[0.5, 0.9, 0.75])
    wrong = {r["file"]: (r["false_positives"], r["false_negatives"]) for r in _rows(tmp_path / "errors.csv")}
    assert wrong == {"img0.png": ("", "car"), "img1.png": ("", "dog"), "img2.png": ("dog", "tree")}


class _Page(HTMLParser):
    """The pictures (alt text) and the text of each <h2> section of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.alts: list[str] = []
        self.sections: dict[str, str] = {}
        self._in_h2, self._current = False, ""

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.alts.append(dict(attrs)["alt"])
        self._in_h2 = tag == "h2"
        if self._in_h2:
            self._current = ""

    def handle_data(self, data):
        if self._in_h2:
            self._current += data
            self.sections[self._current] = ""
        elif self._current:
            self.sections[self._current] += data + "\t"

    def handle_endtag(self, tag):
        self._in_h2 = False if tag == "h2" else self._in_h2


@pytest.fixture
def drawn(monkeypatch) -> dict[str, object]:
    """Every figure the report saves, by file name."""
    figures: dict[str, object] = {}
    save = plots.save_png

    def keep(fig, path, metadata=None):
        save(fig, path, metadata)
        figures[Path(path).name] = fig

    monkeypatch.setattr(plots, "save_png", keep)
    return figures


def test_html_shows_an_ap_bar_per_label_the_frequent_mistakes_and_the_top_losses(tmp_path, drawn):
    classes = ["dog", HOSTILE, "tree"]
    errors = write_errors(tmp_path, "report", LOGITS, LABELS, _split(), classes, Preprocessing(16, 16), title="t")
    md, html, _ = _report(tmp_path, _metrics(classes), classes=classes, errors=errors)
    ax = drawn["report_label_ap.png"].axes[0]
    bars = {t.get_text(): p.get_width() for t, p in zip(ax.get_yticklabels(), ax.patches)}
    assert set(bars) == {"dog", "tree", plots.short_labels([HOSTILE])[0]}
    assert bars["dog"] == pytest.approx(100 * 5 / 6) and bars["tree"] == pytest.approx(50)
    assert [t.get_text() for t in ax.get_yticklabels()][-1] == "tree"  # weakest at the top
    page = _Page()
    page.feed(html)
    assert page.alts == ["average precision of each label", "top losses"]
    assert "mAP" in html.split("<h2>")[0] and "77.78%" in html.split("<h2>")[0]
    given = page.sections["Labels most often given wrongly (false positives)"].split("\t")
    missed = page.sections["Labels most often missed (false negatives)"].split("\t")
    assert given[:6] == ["label", "images", "share of the images without it", "dog", "1", "50.0%"]
    assert given[6:9] == ["tree", "1", "33.3%"] and missed[3:6] == ["dog", "1", "50.0%"]
    per_label = page.sections["Per label (weakest first, by average precision)"]
    assert per_label.index("tree") < per_label.index("dog") < per_label.index(HOSTILE)  # AP 50%, 83%, 100%
    for text in (html, md):
        assert "<img src=x" not in text and "&lt;img src=x" in text
    assert '| &lt;img src=x onerror="alert(1)"&gt;&#124;&#42;a&#42; | 100.0% |' in md  # its row, one cell


def test_curves_and_training_table_show_validation_map(tmp_path, drawn):
    md, html, _ = _report(tmp_path, _metrics(), history=_history())
    table = _md_table(md, "| epoch |")
    header = md.splitlines()[md.splitlines().index("## Training") + 2]
    assert header.split(" | ")[2:5] == ["train exact match", "val mAP", "val exact match"]
    assert [r[3] for r in table] == ["60.00%", "70.00%", "80.00%"]
    right = drawn["curves.png"].axes[1]
    lines = {line.get_label(): list(line.get_ydata()) for line in right.get_lines()}
    assert lines["validation mAP"] == pytest.approx([60.0, 70.0, 80.0])
    assert lines["validation exact match"] == pytest.approx([5.0, 10.0, 15.0])
    assert "mAP" in right.get_title()
    assert "<th>val mAP</th>" in html and "training curves" in html


def test_mosaics_with_wrong_labels_are_on_the_sheet_as_the_model_saw_them(mosaic_csv, tmp_path, monkeypatch):
    """Real pixels: 24 CIFAR-10 mosaics scored right but for one missed label and one wrongly given; errors.csv
    names those two files and labels, and the sheet shows those two mosaics, highest loss first."""
    with open(mosaic_csv, newline="") as f:
        table = list(csv.DictReader(f))[:24]
    classes = sorted({c for r in table for c in r["labels"].split(";")})
    labels = torch.tensor([[int(c in r["labels"].split(";")) for c in classes] for r in table])
    images = torch.stack([torch.from_numpy(np.array(Image.open(mosaic_csv.parent / r["path"]).convert("RGB")))
                          .permute(2, 0, 1) for r in table])
    logits = labels * 8.0 - 4.0
    missed = next(i for i, r in enumerate(table) if ";" in r["labels"])  # a mosaic of several classes
    gone = table[missed]["labels"].split(";")[0]
    logits[missed, classes.index(gone)] = -6.0  # the larger loss: first
    given = next(i for i in range(len(table)) if i != missed and labels[i].sum() < len(classes))
    extra = next(c for c in classes if c not in table[given]["labels"].split(";"))
    logits[given, classes.index(extra)] = 1.0
    sheets = []
    monkeypatch.setattr(error_analysis, "save_png", lambda fig, path, metadata=None: (
        sheets.append(fig), plots.save_png(fig, path, metadata)))
    split = Split("test", images, labels, [r["path"] for r in table])
    info = write_errors(tmp_path, "report", logits, labels, split, classes, Preprocessing(64, 64, (0, 0, 0), (1, 1, 1)))
    rows = _rows(tmp_path / "errors.csv")
    assert [(r["file"], r["false_positives"], r["false_negatives"]) for r in rows] == [
        (table[missed]["path"], "", gone), (table[given]["path"], extra, "")]
    assert info["tiles"] == 2
    tiles = [ax.images[0].get_array() for ax in sheets[0].axes]
    for tile, i in zip(tiles, (missed, given)):
        assert np.allclose(tile, images[i].permute(1, 2, 0).numpy() / 255, atol=1e-6)
    assert f"FN:   {gone}" in sheets[0].axes[0].get_title(loc="left")
    with Image.open(tmp_path / "top_losses.png") as im:
        assert im.text["tiles"] == "2" and im.text["grid"] == "1x2"
