"""The report a user reads: its pictures at 1-30 epochs and 2-100 classes, the lr column, top-5 only where it means
something."""

from __future__ import annotations

import json
import math
import re
import warnings
from html.parser import HTMLParser
from urllib.parse import unquote

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.transforms import Bbox

from conftest import SHARED_CIFAR, link_subset, run_cli
from transferkit import cli
from transferkit.report import RunResult, classification_metrics, plots, write_report

SENTENCE = ("test split of /work/shared/data/cifar10, 10,000 images, stored at 64 px, model input 64x64, "
            "with its mirror image")
TITLE = "mobilenet_v2 on /work/shared/data/cifar10"


@pytest.fixture
def drawn(monkeypatch) -> dict[str, object]:
    """Every figure report.py saves, by file name, as it was laid out when saved."""
    figures: dict[str, object] = {}
    save = plots.save_png

    def keep(fig, path):
        save(fig, path)
        figures[path.name] = fig

    monkeypatch.setattr(plots, "save_png", keep)
    return figures


def _names(k: int) -> list[str]:
    return [f"class_{i:03d}" for i in range(k)]


def _metrics(k: int, per_class: int = 30, confused: tuple[int, int, int] | None = None) -> dict:
    """Metrics of a made-up model that is right 70% of the time; `confused` = (true, predicted, times) on top."""
    g = torch.Generator().manual_seed(k)
    labels = torch.arange(k).repeat_interleave(per_class)
    pred = torch.where(torch.rand(len(labels), generator=g) < 0.7, labels, torch.randint(k, labels.shape, generator=g))
    if confused:
        t, p, n = confused
        labels, pred = torch.cat([labels, torch.full((n,), t)]), torch.cat([pred, torch.full((n,), p)])
    return classification_metrics(torch.nn.functional.one_hot(pred, k).float(), labels, _names(k))


def _history(epochs: int, **lr_keys) -> list[dict]:
    return [{"epoch": e, "train_loss": 2 / (e + 0.5), "train_acc": 1 - 1 / (e + 1.2), "val_acc": 1 - 1 / (e + 1.5),
             "lr": 1e-3 * 0.5 * (1 + math.cos(math.pi * e / epochs)), "seconds": 12.0, "img_per_s": 300.0,
             **lr_keys} for e in range(1, epochs + 1)]


def _renderer(fig):
    return FigureCanvasAgg(fig).get_renderer()  # a saved (closed) figure has lost its canvas


def _fits(fig) -> bool:
    """Everything drawn (titles, labels, tick labels) lies inside the picture."""
    inside = fig.get_tightbbox(_renderer(fig))
    return Bbox.union([inside, fig.bbox_inches]).bounds == pytest.approx(fig.bbox_inches.bounds, abs=0.02)


# item 16: pictures -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 10, 30, 100])
def test_confusion_picture_fits_its_title_and_says_what_it_measured(drawn, tmp_path, k):
    write_report(tmp_path, _metrics(k), title=TITLE, measured_on=SENTENCE, classes=_names(k), setup={})
    fig = drawn["report_confusion.png"]
    assert _fits(fig), "a title or label is cut off at the picture's edge"
    shown = " ".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")) if t.get_visible())
    assert "10,000 images" in shown.replace("\n", " ")  # the details are in the picture, wrapped, not clipped


@pytest.mark.parametrize("k", [2, 10, 30])
def test_confusion_counts_are_readable_and_fit_their_cells(drawn, tmp_path, k):
    write_report(tmp_path, _metrics(k, per_class=300), title=TITLE, measured_on=SENTENCE, classes=_names(k), setup={})
    fig = drawn["report_confusion.png"]
    (ax,) = [a for a in fig.axes if a.images]  # the matrix (not its colour bar)
    renderer = _renderer(fig)
    cell = ax.get_window_extent(renderer).width / k
    counts = [t for t in ax.texts if t.get_text().strip().isdigit()]
    assert counts, "no counts drawn"
    assert min(t.get_fontsize() for t in counts) >= (12 if k <= 10 else 8)
    assert max(t.get_window_extent(renderer).width for t in counts) < cell  # "300" never spills into the next cell


@pytest.mark.parametrize("epochs", [1, 2, 30])
def test_curves_have_whole_epochs_and_train_beside_validation_accuracy(drawn, tmp_path, epochs):
    write_report(tmp_path, _metrics(3), title=TITLE, measured_on=SENTENCE, classes=_names(3), setup={},
                 history=_history(epochs))
    fig = drawn["curves.png"]
    assert _fits(fig)
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(t == int(t) for t in ticks), f"fractional epoch ticks {ticks}"
        assert set(range(1, epochs + 1)) <= {round(t) for t in ticks} or len(ticks) >= 4
    (acc,) = [a for a in fig.axes if "accuracy" in a.get_title().lower()]
    labels = {line.get_label() for line in acc.get_lines()}
    assert {"train", "validation"} <= labels
    lo, hi = acc.get_ylim()
    assert 0 <= lo and hi <= 100 and hi - lo >= 10  # one epoch is not drawn on a 59.4 ... 60.6 axis
    (loss,) = [a for a in fig.axes if "loss" in a.get_title().lower()]
    assert loss.get_ylim()[0] == 0


def test_many_classes_draw_the_most_confused_pairs_instead_of_the_matrix(drawn, tmp_path):
    metrics = _metrics(100, per_class=10, confused=(7, 42, 9))
    md = write_report(tmp_path, metrics, title=TITLE, measured_on=SENTENCE, classes=_names(100), setup={})
    fig = drawn["report_confusion.png"]
    assert _fits(fig)
    (ax,) = fig.axes
    rows = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert 5 <= len(rows) <= 25
    assert "class_007" in rows[-1] and "class_042" in rows[-1]  # barh draws the first pair at the top
    text = md.read_text()
    assert "class_007 → class_042" in text and "most confused" in text.lower()


def test_many_classes_without_a_mistake_say_so(drawn, tmp_path):
    labels = torch.arange(40).repeat(3)
    metrics = classification_metrics(torch.nn.functional.one_hot(labels, 40).float(), labels, _names(40))
    md = write_report(tmp_path, metrics, title=TITLE, measured_on=SENTENCE, classes=_names(40), setup={})
    assert _fits(drawn["report_confusion.png"]) and "no image was misclassified" in md.read_text()


# item 17: lr ----------------------------------------------------------------------------------------------------

def test_training_table_shows_each_epochs_first_and_last_lr_and_reads_old_rows(tmp_path):
    rows = _history(2)
    rows[0].pop("lr")
    rows[0].update(lr_start=1e-4, lr_end=1e-3)
    rows[1].pop("lr")
    rows[1].update(lr_start=1e-3, lr_end=5e-4)
    text = write_report(tmp_path, _metrics(3), title=TITLE, measured_on=SENTENCE, classes=_names(3), setup={},
                        history=rows).read_text()
    assert "| 1.0e-04 → 1.0e-03 |" in text and "| 1.0e-03 → 5.0e-04 |" in text

    old = _history(2)  # a run from before: one lr per epoch, at its end
    text = write_report(tmp_path, _metrics(3), title=TITLE, measured_on=SENTENCE, classes=_names(3), setup={},
                        history=old).read_text()
    assert f"| → {old[1]['lr']:.1e} |" in text


# item 18: top-5 -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 5])
def test_top5_is_null_with_five_classes_or_fewer(tmp_path, k):
    metrics = _metrics(k)
    assert "top5" in metrics and metrics["top5"] is None
    write_report(tmp_path, metrics, title=TITLE, measured_on=SENTENCE, classes=_names(k), setup={})
    assert "top-" not in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["top5"] is None


def test_top5_is_reported_with_more_than_five_classes(tmp_path):
    metrics = _metrics(6)
    assert 0 < metrics["top5"] <= 1 and metrics["top5"] > metrics["accuracy"]
    write_report(tmp_path, metrics, title=TITLE, measured_on=SENTENCE, classes=_names(6), setup={})
    assert "| top-5 accuracy |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("k", [3, 10])
def test_cli_prints_top5_only_where_it_means_something(tmp_path, capsys, monkeypatch, k):
    metrics = _metrics(k)
    cli._print_result(RunResult(tmp_path, metrics, SENTENCE, seconds=60))
    printed = capsys.readouterr().out
    assert printed.startswith(f"accuracy {100 * metrics['accuracy']:.2f}%")
    assert ("top-5" in printed) == (k > 5) and "top-3" not in printed

    import transferkit.evaluate

    monkeypatch.setattr(transferkit.evaluate, "evaluate_run", lambda *a, **kw: (metrics, SENTENCE, tmp_path / "r.md"))
    args = cli.build_parser().parse_args(["eval", str(tmp_path), "--data", "somewhere", "--split", "test",
                                          "--batch-size", "8", "--device", "cpu"])
    assert cli.cmd_eval(args) == 0
    printed = capsys.readouterr().out
    assert ("top-5" in printed) == (k > 5) and "top-3" not in printed


# items 16-18 through a real run ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def three_class_run(tmp_path_factory):
    """A real 2-epoch CLI run on 3 CIFAR-10 classes (random weights, head only, 32 px: seconds): a warmup
    epoch, then a cosine one."""
    if not (SHARED_CIFAR / "train").is_dir():
        pytest.skip(f"shared CIFAR-10 folder not found at {SHARED_CIFAR}")
    root = tmp_path_factory.mktemp("three")
    link_subset(SHARED_CIFAR / "train", root / "train", 16, ["airplane", "cat", "ship"])
    link_subset(SHARED_CIFAR / "test", root / "test", 6, ["airplane", "cat", "ship"])
    out = tmp_path_factory.mktemp("runs") / "three"
    proc = run_cli("train", "--data", root, "--model", "mobilenet_v2", "--weights", "none", "--strategy", "linear",
                   "--lr", "3e-3", "--epochs", "2", "--warmup-epochs", "1", "--image-size", "32", "--batch-size", "8",
                   "--val-split", "0.25", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, out, proc


def test_real_run_records_first_and_last_lr_and_no_top5_of_three_classes(three_class_run):
    root, out, proc = three_class_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows
    assert first["lr_start"] < first["lr_end"] == pytest.approx(3e-3)  # warmup to the peak (--lr 3e-3)
    assert last["lr_start"] > last["lr_end"] > 0  # cosine: the last step still trains
    assert f"lr {last['lr_start']:.1e} -> {last['lr_end']:.1e}" in proc.stderr
    assert f"{last['lr_start']:.1e} → {last['lr_end']:.1e}" in (out / "report.md").read_text()
    assert "top-" not in proc.stdout and json.loads((out / "report.json").read_text())["top5"] is None
    proc = run_cli("eval", out, "--data", root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("accuracy ") and "top-" not in proc.stdout


# issue 27 ---------------------------------------------------------------------------------------------------------

HOSTILE = ['"><img src=x onerror=alert(1)>', "pipe | *star* [link](javascript:alert(2)) `tick`", "new\nline",
           "plain_name", "dog's #1 &amp; _cat_ ~~x~~ &#x27;"]


class _Rendered(HTMLParser):
    """What a Markdown viewer that passes inline HTML makes of report.md: its tags, pictures and table cells."""

    def __init__(self) -> None:
        super().__init__()
        self.tags, self.pictures, self.cells, self._cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "img":
            self.pictures.append(dict(attrs).get("src"))
        if tag == "td":
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_report_md_shows_hostile_class_and_folder_names_as_text_in_a_markdown_viewer(tmp_path):
    """Names from the user's folders (classes, the data path, an eval report's name) are text in report.md, as in
    report.html: no tag, no link, no broken table row, the characters the user wrote."""
    import markdown

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat(10)
    pred = torch.where(torch.rand(50, generator=g) < 0.6, labels, (labels + 1) % 5)
    metrics = classification_metrics(torch.nn.functional.one_hot(pred, 5).float(), labels, HOSTILE)
    name = "eval-x)<img src=y onerror=alert(3)>-test"
    md = write_report(tmp_path, metrics, title="m on /data/<script>alert(4)</script>", name=name,
                      measured_on="test split of /data/<b>x</b>, 40 images", classes=HOSTILE,
                      setup={"data": "/data/<iframe src=z>"}, history=_history(2))
    page = _Rendered()
    page.feed(markdown.markdown(md.read_text(encoding="utf-8"), extensions=["tables"]))
    tags = {tag for tag, _ in page.tags}
    assert not tags & {"script", "iframe", "a", "b", "code", "em", "del", "s"}, tags
    assert not any(k.startswith("on") for _, attrs in page.tags for k in attrs)
    assert sorted(unquote(p) for p in page.pictures) == ["curves.png", f"{name}_confusion.png"]
    assert all((tmp_path / unquote(p)).is_file() for p in page.pictures)
    for cls in HOSTILE:  # the per-class table holds each name as written (a line break shown as \n)
        assert cls.replace("\n", "\\n") in page.cells
    assert all(len(row) == 5 for row in _md_table(md.read_text(encoding="utf-8"), "| class |"))


def _md_table(text: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table under `header`, split on unescaped pipes."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(re.split(r"(?<!\\)\|", line.strip())[1:-1])
    return rows


NON_LATIN = ["猫", "犬の写真", "кошка", "कुत्ता", "plain"]  # Devanagari: no font here may have it


def test_non_latin_class_names_draw_in_a_font_that_has_them_and_no_glyph_warning_reaches_the_user(
        drawn, tmp_path, caplog):
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    labels = torch.arange(5).repeat(6)
    pred = (labels + torch.arange(30) % 2) % 5
    metrics = classification_metrics(torch.nn.functional.one_hot(pred, 5).float(), labels, NON_LATIN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_report(tmp_path, metrics, title="模型 on /data/写真", measured_on=SENTENCE, classes=NON_LATIN,
                     setup={}, history=_history(2))
    raw = [str(w.message) for w in caught if "Glyph" in str(w.message) or "font" in str(w.message).lower()]
    assert not raw, raw[:2]
    assert "findfont" not in caplog.text
    if not any("CJK" in f.name for f in font_manager.fontManager.ttflist):
        return  # the fallback: boxes, quietly (scripts/setup.sh installs fonts-noto-cjk)
    (ax,) = [a for a in drawn["report_confusion.png"].axes if a.images]
    tick = next(t for t in ax.get_yticklabels() if t.get_text() == "猫")
    fonts = [FT2Font(font_manager.findfont(f, fallback_to_default=False)) for f in tick.get_fontfamily()]
    assert any(f.get_char_index(ord("猫")) for f in fonts), "猫 would be drawn as a box"


def test_a_210_character_class_name_is_shortened_in_the_picture_and_whole_in_the_tables(drawn, tmp_path):
    long = ("photographs_of_the_northern_river_otter_taken_at_dusk_" * 4)[:209] + "2"
    classes = [long, "cat", "dog"]
    metrics = dict(_metrics(3), per_class=[dict(r, **{"class": c}) for r, c in zip(_metrics(3)["per_class"], classes)])
    md = write_report(tmp_path, metrics, title=TITLE, measured_on=SENTENCE, classes=classes, setup={})
    fig = drawn["report_confusion.png"]
    assert _fits(fig)
    (ax,) = [a for a in fig.axes if a.images]
    renderer = _renderer(fig)
    assert ax.get_window_extent(renderer).width > 0.4 * fig.bbox.width  # the matrix, not the name, fills it
    shown = [t.get_text() for t in ax.get_yticklabels()]
    assert shown[0].startswith("photographs_of") and shown[0].endswith(long[-6:]) and "…" in shown[0]
    assert len(shown[0]) <= 28 and shown[1:] == ["cat", "dog"]
    assert f"| {long} |" in md.read_text()  # the tables give the whole name
    assert long in (tmp_path / "report.html").read_text()


def test_curves_draw_the_validation_loss_beside_the_training_loss(drawn, tmp_path):
    history = [dict(h, val_loss=1.5 / (h["epoch"] + 0.2)) for h in _history(4)]
    history[2]["val_loss"] = None  # an epoch without validation leaves a gap, not a zero
    write_report(tmp_path, _metrics(3), title=TITLE, measured_on=SENTENCE, classes=_names(3), setup={},
                 history=history)
    fig = drawn["curves.png"]
    assert _fits(fig)
    (loss,) = [a for a in fig.axes if "loss" in a.get_title().lower()]
    lines = {line.get_label(): line for line in loss.get_lines()}
    assert {"train", "validation"} <= set(lines)
    val = lines["validation"]
    assert list(val.get_xdata()) == [1, 2, 4]
    assert list(val.get_ydata()) == pytest.approx([history[i]["val_loss"] for i in (0, 1, 3)])
    assert loss.get_ylim()[1] >= max(h["train_loss"] for h in history)


@pytest.mark.parametrize("crop_scale", [1.0, 0.64])
def test_the_setup_line_says_how_much_of_the_image_the_crop_really_keeps(crop_scale):
    """The demo's --crop-scale 1 was reported as 'random-resized crop (area >= 1)', yet the aspect jitter trims
    one side of most images: the line gives the share the transform itself keeps (measured on a coordinate
    image: each pixel holds its own x and y)."""
    from transferkit.config import TrainConfig
    from transferkit.data.preprocess import Preprocessing
    from transferkit.data.transforms import TrainTransform
    from transferkit.training.summary import augmentation_line

    line = augmentation_line(TrainConfig(data="somewhere", crop_scale=crop_scale), cached=False)
    stated = re.search(r"(\d+)-100% of the image", line)
    assert stated and ">=" not in line and "+ flip" in line, line
    side = 64
    tf = TrainTransform(Preprocessing(side, side, (0.0,) * 3, (1.0,) * 3), flip=False, scale=(crop_scale, 1.0))
    ramp = torch.arange(side).float().view(1, side).expand(side, side)
    image = torch.stack([ramp, ramp.t(), torch.zeros(side, side)]).mul(255 / (side - 1)).round().to(torch.uint8)
    out = tf(image.expand(1000, 3, side, side).contiguous(), torch.Generator().manual_seed(0)) * (side - 1)
    extent = [(out[:, c].amax((1, 2)) - out[:, c].amin((1, 2)) + 1) / side for c in (0, 1)]
    kept = extent[0] * extent[1]
    assert abs(100 * kept.min().item() - int(stated.group(1))) <= 3
    assert kept.max().item() > 0.97
