"""report.html: one self-contained page that a real headless browser renders without errors, every user string
escaped."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import SHARED_CIFAR, needs_weights, run_cli

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
# Class folders named with HTML's special characters: only escaping keeps them text.
CLASSES = {'<b>&"cat"': "cat", "dog's <i>": "dog", "ship": "ship"}


def _browser() -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        pytest.skip(f"no headless browser found (looked for {', '.join(BROWSERS)}); scripts/setup.sh installs "
                    "Debian's chromium when run as root with apt")
    return found


class _Page(HTMLParser):
    """The rendered DOM's text, its tags and the sources of its pictures."""

    def __init__(self) -> None:
        super().__init__()
        self.text, self.tags, self.sources = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.sources += [v for k, v in attrs if k in ("src", "href")]

    def handle_data(self, data):
        self.text.append(data)


def _render(browser: str, page: Path, where: Path) -> tuple[_Page, str, Path]:
    """The DOM Chromium built from `page`, its console output, and a screenshot."""
    common = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
              f"--user-data-dir={where / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = where / f"{page.stem}.png"
    snap = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert snap.returncode == 0, snap.stderr[-2000:]
    parsed = _Page()
    parsed.feed(dom.stdout)
    return parsed, dom.stderr + snap.stderr, shot


@pytest.fixture(scope="module")
def odd_names_run(tmp_path_factory) -> Path:
    """A real calibrated run on three CIFAR-10 classes whose folder names hold <, >, &, quotes."""
    if not (SHARED_CIFAR / "train").is_dir():
        pytest.skip(f"shared CIFAR-10 folder not found at {SHARED_CIFAR}")
    root = tmp_path_factory.mktemp("odd")
    for split, n in (("train", 40), ("test", 20)):
        for name, cifar in CLASSES.items():
            (root / "data" / split / name).mkdir(parents=True)
            for f in sorted((SHARED_CIFAR / split / cifar).iterdir())[:n]:
                (root / "data" / split / name / f.name).symlink_to(f)
    out = root / "run"
    proc = run_cli("train", "--data", root / "data", "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1",
                   "--strategy", "linear", "--epochs", "2", "--lr", "3e-3", "--image-size", "32", "--batch-size", "32",
                   "--val-split", "0.25", "--workers", "1", "--calibrate", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_cli("eval", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@needs_weights
def test_report_html_renders_in_a_headless_browser_with_every_class_name_and_the_accuracy(odd_names_run, tmp_path):
    browser = _browser()
    pages = [odd_names_run / "report.html", *odd_names_run.glob("eval-*.html")]
    assert len(pages) == 2, sorted(p.name for p in odd_names_run.iterdir())
    for page in pages:
        raw = page.read_text()
        # Self-contained: no script, no stylesheet or font from elsewhere, every picture inside the file.
        assert "<script" not in raw and "<link" not in raw and "url(" not in raw
        figures = json.loads(page.with_suffix(".json").read_text())
        dom, console, shot = _render(browser, page, tmp_path)
        assert not [line for line in console.splitlines() if ":CONSOLE" in line or "Uncaught" in line], console
        assert dom.sources and all(s.startswith("data:image/png;base64,") for s in dom.sources), dom.sources[:3]
        images = 3 if page.name == "report.html" else 2  # curves (train only), confusion matrix, reliability
        assert len(dom.sources) >= images
        text = " ".join(dom.text)
        assert f"{100 * figures['accuracy']:.2f}%" in text
        for name in CLASSES:
            assert name in text, name
        assert "b" not in dom.tags and "i" not in dom.tags  # the class names stayed text
        for section in ("Per class", "Confusion matrix", "Most confused pairs", "Calibration", "Settings"):
            assert section in text, section
        assert re.search(r"after \(temperature [\d.]+, fitted on the validation split\)", text)
        assert shot.stat().st_size > 20_000  # a page with pictures, not a blank one


@needs_weights
def test_the_per_class_table_opens_with_the_weakest_class(odd_names_run):
    figures = json.loads((odd_names_run / "report.json").read_text())
    weakest = min(figures["per_class"], key=lambda r: (r["f1"], r["recall"]))["class"]
    raw = (odd_names_run / "report.html").read_text()
    table = raw[raw.index("Per class"):raw.index("Confusion matrix")]
    first = re.search(r"<tbody><tr><td>(.*?)</td>", table).group(1)
    assert first == weakest.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace(
        '"', "&quot;").replace("'", "&#x27;")


def test_pictures_and_tables_other_sections_add_are_inlined_too(tmp_path):
    """A top-losses sheet beside the report (<name>_*.png) and a list of records in the metrics get a section."""
    import torch

    from transferkit.report import classification_metrics
    from transferkit.report.html import write_html
    from transferkit.report.plots import pyplot as _pyplot
    from transferkit.report.plots import save_png as _save_png

    classes = ["a<1>", "b&2"]
    metrics = classification_metrics(torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 1, 1]),
                                     classes)
    metrics["most_confused"] = [{"true": "b&2", "predicted": "a<1>", "images": 1}]
    fig, ax = _pyplot().subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    _save_png(fig, tmp_path / "eval-x-test_top_losses.png")
    page = write_html(tmp_path, metrics, title="t", measured_on="m", classes=classes, setup={"run": "<r>"},
                      name="eval-x-test").read_text()
    assert "<h2>Top losses</h2>" in page and page.count('src="data:image/png;base64,') == 1
    assert "<h2>Most confused</h2>" in page and "<td>b&amp;2</td><td>a&lt;1&gt;</td><td>1</td>" in page
    assert "&lt;r&gt;" in page and "<r>" not in page
