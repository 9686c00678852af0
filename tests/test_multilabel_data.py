"""Multi-label data: a label file's labels column read as multi-hot rows (on the CIFAR-10 mosaics), the task it
picks and says, iterative stratification, and the checks (leakage, label conflicts, resume fingerprint) on sets of
labels."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch

from conftest import SHARED_CIFAR, run_cli
from transferkit.data import heldout
from transferkit.data.preprocess import Preprocessing
from transferkit.data.sources import inverse_frequency, load_source, train_val_test
from transferkit.data.splits import stratified_split, stratified_subset
from transferkit.errors import TransferkitError
from transferkit.training import fingerprint

STORE = Preprocessing(32, 32)
SPLITS = ("train", "val", "test")
CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TINY = ["--weights", "none", "--image-size", "32", "--epochs", "1", "--batch-size", "16", "--workers", "1"]


def _load(table: Path, **kw) -> object:
    return load_source(str(table), preprocessing=STORE, splits=SPLITS, use_cache=False, workers=1, **kw)


def _cells(table: Path) -> dict[str, set[str]]:
    """{absolute path: its set of labels} as the csv names them."""
    with table.open() as f:
        return {str(table.parent / r["path"]): set(filter(None, r["labels"].split(";"))) for r in csv.DictReader(f)}


def _table(tmp_path: Path, mosaic_csv: Path, lines: list[str], name: str = "labels.csv") -> Path:
    """A hand-written table beside a link to the mosaics' images."""
    (tmp_path / "img").symlink_to(mosaic_csv.parent / "images")
    table = tmp_path / name
    table.write_text("".join(line + "\n" for line in lines))
    return table


def test_a_labels_column_reads_as_multi_hot_rows_and_auto_says_it_is_multi_label(mosaic_csv, caplog):
    caplog.set_level(logging.INFO, "transferkit")
    src = _load(mosaic_csv)
    assert src.multilabel and src.classes == CIFAR
    labels = src.train.labels
    assert labels.dtype == torch.int64 and labels.shape == (160, 10)
    cells = _cells(mosaic_csv)
    for f, row in zip(src.train.files, labels.tolist()):
        assert {c for c, on in zip(CIFAR, row) if on} == cells[f]
    assert set(labels.sum(1).tolist()) == {1, 2, 3, 4}  # images of one to four classes
    several = sum(len(c) > 1 for c in cells.values())
    assert (f"labels.csv: {several} rows carry several labels: multi-label task (sigmoid head); "
            "pass --task single to refuse such rows") in caplog.text


def test_task_single_refuses_a_row_with_several_labels_by_its_line(mosaic_csv, tmp_path):
    proc = run_cli("train", "--data", mosaic_csv, "--task", "single", *TINY, "--out", tmp_path / "run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    first = next(i for i, line in enumerate(mosaic_csv.read_text().splitlines(), 1) if ";" in line)
    cell = mosaic_csv.read_text().splitlines()[first - 1].split(",")[1]
    assert (f"line {first}: carries {cell.count(';') + 1} labels ({cell}); single-label task"
            in proc.stderr), proc.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_task_multilabel_on_class_folders_is_refused_in_a_sentence(tmp_path):
    if not (SHARED_CIFAR / "test").is_dir():
        pytest.skip(f"shared CIFAR-10 folder not found at {SHARED_CIFAR}")
    proc = run_cli("train", "--data", SHARED_CIFAR / "test", "--task", "multilabel", *TINY, "--out", tmp_path / "r")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--task multilabel needs a label file with a labels column" in proc.stderr, proc.stderr


def test_empty_cells_one_label_rows_and_task_multilabel(mosaic_csv, tmp_path, caplog):
    caplog.set_level(logging.INFO, "transferkit")
    rows = [f"img/{i:05d}.png,{lab}" for i, lab in enumerate(["cat", "dog", "cat ; dog;", "", "ship", "dog"])]
    table = _table(tmp_path, mosaic_csv, ["path,labels", *rows])
    src = _load(table)  # auto: one row carries two labels
    assert src.multilabel and src.classes == ["cat", "dog", "ship"]
    assert src.train.labels.tolist() == [[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0]]
    assert "1 rows carry several labels" in caplog.text and "1 rows carry no label" in caplog.text
    with pytest.raises(TransferkitError, match=r"line 4: carries 2 labels \(cat;dog\); single-label task.*"
                                               "line 5: empty label"):
        _load(table, task="single")
    (tmp_path / "one").mkdir()
    one = _table(tmp_path / "one", mosaic_csv, ["path,labels", *(r for r in rows if ";" not in r and r[-1] != ",")])
    assert not _load(one).multilabel  # one label a row: single-label, class indices
    forced = _load(one, task="multilabel")
    assert forced.multilabel and forced.train.labels.shape == (4, 3)
    assert forced.train.labels.sum(1).tolist() == [1, 1, 1, 1]


def test_a_split_column_with_labels_and_every_label_needs_a_training_image(mosaic_csv, tmp_path, caplog):
    caplog.set_level(logging.INFO, "transferkit")
    lines = ["path,labels,split", "img/00000.png,cat;dog,train", "img/00001.png,cat,train", "img/00002.png,dog,train",
             "img/00003.png,dog;cat,val", "img/00004.png,cat,test", "img/00005.png,,test"]
    table = _table(tmp_path, mosaic_csv, lines)
    src = _load(table)
    assert [len(s) for s in (src.train, src.val, src.test)] == [3, 1, 2]
    assert src.val.labels.tolist() == [[1, 1]] and src.test.labels.tolist() == [[1, 0], [0, 0]]
    train, val, _ = train_val_test(src, 0.2, 0)
    assert val is src.val and "held out" not in caplog.text  # the table's own val: nothing carved
    table.write_text("\n".join([*lines, "img/00006.png,cat;ship,test"]) + "\n")
    with pytest.raises(TransferkitError, match="label\\(s\\) ship are on no train row"):
        _load(table)


def test_iterative_stratification_keeps_each_labels_share_and_is_seeded(mosaic_csv, caplog):
    caplog.set_level(logging.INFO, "transferkit")
    src = _load(mosaic_csv)
    train, val, _ = train_val_test(src, 0.25, seed=0)
    assert "iterative stratification over labels" in caplog.text
    positives = src.train.labels.sum(0).float()
    assert (val.labels.sum(0) - 0.25 * positives).abs().max() <= 1  # each label within one image of its share
    assert len(train) + len(val) == 160 and abs(len(val) - 40) <= 5
    assert set(train.files).isdisjoint(val.files)
    # synthetic rows: common and rare labels, some rows without any
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(3000, 6, generator=g) < torch.tensor([0.5, 0.3, 0.1, 0.03, 0.01, 0.004])).long()
    keep, held = stratified_split(labels, 0.2, seed=5)
    assert (labels[held].sum(0) - 0.2 * labels.sum(0)).abs().max() <= 1
    assert abs(len(held) - 600) <= 30 and sorted(keep.tolist() + held.tolist()) == list(range(3000))
    assert torch.equal(held, stratified_split(labels, 0.2, seed=5)[1])
    assert not torch.equal(held, stratified_split(labels, 0.2, seed=6)[1])
    sub = stratified_subset(labels, 1000, seed=0)
    assert (labels[sub].sum(0) - labels.sum(0) / 3).abs().max() <= 1


def test_max_train_images_keeps_every_label_and_single_label_carving_says_by_class(mosaic_csv, caplog):
    caplog.set_level(logging.INFO, "transferkit")
    src = _load(mosaic_csv, max_train_images=60)
    assert src.multilabel and abs(len(src.train) - 60) <= 8
    assert (src.train.labels.sum(0) > 0).all()
    if not (SHARED_CIFAR / "test").is_dir():
        return
    folder = load_source(str(SHARED_CIFAR / "test"), preprocessing=STORE, splits=("train",), workers=1,
                         max_train_images=50)
    train_val_test(folder, 0.2, 0)
    assert "stratified by class" in caplog.text


def test_class_weights_auto_is_a_positive_weight_per_label():
    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]] * 250)
    weights = inverse_frequency(labels, 3)
    # negatives / positives: 250/750, 750/250; a label on no image is held to the limit
    assert weights.tolist() == pytest.approx([1 / 3, 3.0, 100.0])


def test_a_copy_given_two_sets_of_labels_is_a_label_conflict_and_dedupe_drops_it(mosaic_csv, tmp_path, caplog):
    caplog.set_level(logging.INFO, "transferkit")
    lines = ["path,labels,split", *(f"img/{i:05d}.png,cat;dog,train" for i in range(4)),
             *(f"img/{i:05d}.png,cat,train" for i in range(4, 8)), "copy.png,cat,test", "img/00009.png,dog,test"]
    table = _table(tmp_path, mosaic_csv, lines)
    (tmp_path / "copy.png").write_bytes((tmp_path / "img" / "00000.png").read_bytes())
    src = _load(table)
    heldout.check_copies(src)
    assert "label conflicts: 1 file(s) given more than one set of labels" in caplog.text
    assert "img/00000.png (cat;dog) = copy.png (cat)" in caplog.text, caplog.text
    heldout.check_copies(src, dedupe=True)
    assert len(src.train) == 7 and src.test.files == [str(tmp_path / "img" / "00009.png")]


def test_an_edited_labels_cell_is_a_changed_file_naming_its_row(mosaic_csv, tmp_path):
    lines = mosaic_csv.read_text().replace("images/", "img/").splitlines()
    table = _table(tmp_path, mosaic_csv, lines)
    recorded = {"listing": fingerprint.data_listing(_load(table), str(table))}
    path, cell = lines[5].split(",")
    edited = "cat" if cell != "cat" else "dog"  # another set of labels, the classes unchanged
    table.write_text("\n".join([*lines[:5], f"{path},{edited}", *lines[6:]]) + "\n")
    src = _load(table)
    with pytest.raises(TransferkitError, match=f"1 training image changed in {table} since the run started "
                                               f"\\(first: {path}, line 6 of labels.csv\\)"):
        fingerprint.check_data(recorded, fingerprint.data_listing(src, str(table)), {}, src, str(table))


def test_resume_on_an_edited_labels_cell_is_refused_naming_its_row(mosaic_csv, tmp_path):
    lines = mosaic_csv.read_text().replace("images/", "img/").splitlines()[:41]  # 40 mosaics: a short run
    table = _table(tmp_path, mosaic_csv, lines)
    out = tmp_path / "run"
    first = run_cli("train", "--data", table, *TINY, "--model", "resnet18", "--val-split", "0.25", "--out", out)
    assert first.returncode == 0, first.stderr
    path, cell = lines[3].split(",")
    edited = ";".join(sorted(set(cell.split(";")) ^ {"cat"})) or "dog"  # cat added or taken away
    table.write_text("\n".join([*lines[:3], f"{path},{edited}", *lines[4:]]) + "\n")
    proc = run_cli("train", "--resume", out, "--epochs", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"changed in {table} since the run started (first: {path}, line 4 of labels.csv)" in proc.stderr, \
        proc.stderr


def test_tables_that_would_be_misread_are_bad_rows_named_by_line(mosaic_csv, tmp_path):
    # a carriage return inside a line (an awk edit of a CRLF file), JSON list items that are not text, a ';' inside
    # an item (it would split on the way back out, in predict --csv), an empty labels cell of a one-label table
    for sub in "abc":
        (tmp_path / sub).mkdir()
    crlf = _table(tmp_path / "a", mosaic_csv, ["path,labels", "img/00000.png,cat\rdog", "img/00001.png,cat"])
    json_rows = ['{"path": "img/00000.png", "labels": ["cat", 3]}', '{"path": "img/00001.png", "labels": [["x"]]}',
                 '{"path": "img/00002.png", "labels": ["a;b", "cat"]}', '{"path": "img/00003.png", "labels": ["dog"]}']
    jsonl = _table(tmp_path / "b", mosaic_csv, json_rows, "labels.jsonl")
    empty = _table(tmp_path / "c", mosaic_csv,
                   ["path,labels", "img/00000.png,cat", "img/00001.png,", "img/00002.png,dog"])
    for table, says in ((crlf, ["line 2: a carriage return"]),
                        (jsonl, ["line 1: item 2 of the labels list is 3, not text",
                                 'line 2: item 1 of the labels list is ["x"], not text',
                                 "line 3: label 'a;b' holds ';'"]),
                        (empty, ["line 3: empty label (an image with none of the labels: pass --task multilabel)"])):
        proc = run_cli("train", "--data", table, *TINY, "--out", tmp_path / "runs" / table.parent.name)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and all(s in proc.stderr for s in says), proc.stderr
    old_mac = tmp_path / "mac.csv"
    old_mac.write_bytes(b"path,labels\rimg/00000.png,cat\r")
    proc = run_cli("train", "--data", old_mac, *TINY, "--out", tmp_path / "runs" / "mac")
    assert proc.returncode == 2 and "carriage return" in proc.stderr and "Traceback" not in proc.stderr
