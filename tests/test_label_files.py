"""Label files (--data labels.csv/.tsv/.jsonl): the same run as class folders, bad rows refused by line."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cifar_folder, run_cli

TINY = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--epochs", "1", "--batch-size", "16",
        "--workers", "1", "--val-split", "0.2", "--seed", "3"]


@pytest.fixture(scope="module")
def cifar_csv(tmp_path_factory) -> Path:
    """Shared CIFAR-10 subset as class folders, and labels.csv beside them naming the same files (rows shuffled)."""
    root = cifar_folder(tmp_path_factory, "cifar_csv", 12, 4, ["airplane", "cat", "ship"])
    rows = [(f.relative_to(root).as_posix(), f.parent.name, f.parent.parent.name)
            for f in root.glob("*/*/*.*")]
    rows.sort(key=lambda r: r[0][::-1])  # another order than the folders': the table's order does not matter
    (root / "labels.csv").write_text("path,label,split\n" + "".join(f"{p},{c},{s}\n" for p, c, s in rows))
    return root


def _table(tmp_path: Path, cifar_csv: Path, lines: list[str], name: str = "labels.csv") -> Path:
    """A table in tmp_path over the fixture's images (its paths absolute-free: links beside it)."""
    (tmp_path / "img").symlink_to(cifar_csv / "train")
    table = tmp_path / name
    table.write_text("".join(line + "\n" for line in lines))
    return table


def _good_rows(cifar_csv: Path, per_class: int = 6) -> list[str]:
    rows = []
    for c in ("airplane", "cat", "ship"):
        rows += [f"img/{c}/{f.name},{c}" for f in sorted((cifar_csv / "train" / c).iterdir())[:per_class]]
    return rows


def test_csv_trains_the_same_weights_as_class_folders(cifar_csv, tmp_path):
    folders = run_cli("train", "--data", cifar_csv, *TINY, "--out", tmp_path / "folders")
    table = run_cli("train", "--data", cifar_csv / "labels.csv", *TINY, "--out", tmp_path / "csv")
    assert folders.returncode == 0, folders.stderr
    assert table.returncode == 0, table.stderr
    a, b = load_file(tmp_path / "folders" / "model.safetensors"), load_file(tmp_path / "csv" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    split = json.loads((tmp_path / "csv" / "split.json").read_text())
    assert split["classes"] == ["airplane", "cat", "ship"] and split["evaluate"] == "test"
    assert split["val"]["source"] == "carved from train"
    assert all(f.startswith("train/") for f in split["val"]["files"])
    # eval finds the run's held-out split in the table as it does in the folders
    ev = run_cli("eval", tmp_path / "csv", "--split", "val")
    assert ev.returncode == 0, ev.stderr


@pytest.mark.parametrize("bad, said", [
    ("img/cat/nothere.jpg,cat", "line {n}: file img/cat/nothere.jpg not found"),
    ("img/cat/{f},", "line {n}: empty label"),
    ("../elsewhere.png,cat", "line {n}: path ../elsewhere.png is outside"),
    ("/etc/hostname,cat", "line {n}: path /etc/hostname is outside"),
    ("img/cat/{f},dog", "line {n}: file {f} has label 'dog' (train) here and 'cat' (train) on line"),
])
def test_each_bad_row_is_refused_by_line(cifar_csv, tmp_path, bad, said):
    rows = _good_rows(cifar_csv)
    f = rows[6].split(",")[0].split("/")[-1]  # a cat image the table already names
    lines = ["path,label", *rows, bad.format(f=f)]
    table = _table(tmp_path, cifar_csv, lines)
    proc = run_cli("train", "--data", table, *TINY, "--out", tmp_path / "run")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "1 bad row(s)" in proc.stderr or "2 bad row(s)" in proc.stderr, proc.stderr
    assert said.format(n=len(lines), f=f) in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_split_values_headers_and_encoding(cifar_csv, tmp_path):
    rows = _good_rows(cifar_csv)
    table = _table(tmp_path, cifar_csv, ["path,label,split", *(r + ",train" for r in rows),
                                          rows[0] + ",validation", rows[1]])
    proc = run_cli("train", "--data", table, *TINY, "--out", tmp_path / "r1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "2 bad row(s)" in proc.stderr
    assert f"line {len(rows) + 2}: split 'validation' is not train, val or test" in proc.stderr
    assert f"line {len(rows) + 3}: empty split (train, val or test)" in proc.stderr  # a short row
    table.write_text("path,lable\n" + "".join(r + "\n" for r in rows))
    proc = run_cli("train", "--data", table, *TINY, "--out", tmp_path / "r2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "has no 'label' column" in proc.stderr and "is 'lable' meant to be 'label'?" in proc.stderr
    table.write_text("".join(r + "\n" for r in rows))  # no header at all
    proc = run_cli("train", "--data", table, *TINY, "--out", tmp_path / "r3")
    assert proc.returncode == 2 and "has no 'path' column" in proc.stderr, proc.stderr
    table.write_bytes(b"path,label\n" + "".join(r + "\n" for r in rows).encode() + b"img/caf\xe9.png,cat\n")
    proc = run_cli("train", "--data", table, *TINY, "--out", tmp_path / "r4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"line {len(rows) + 2}: not UTF-8 text (byte 0xe9 at column 8)" in proc.stderr, proc.stderr


def test_skip_bad_rows_lists_them_in_skipped_txt(cifar_csv, tmp_path):
    rows = _good_rows(cifar_csv)
    table = _table(tmp_path, cifar_csv, [json.dumps(dict(zip(("path", "label"), r.split(",")))) for r in rows]
                   + ['{"path": "img/cat/gone.png", "label": "cat"}', '{"path": "x.png"', rows[0].join('""')],
                   name="labels.jsonl")
    proc = run_cli("train", "--data", table, *TINY, "--out", tmp_path / "run", "--skip-bad-rows")
    assert proc.returncode == 0, proc.stderr
    skipped = (tmp_path / "run" / "skipped.txt").read_text().splitlines()
    n = len(rows)
    assert [line.split("\t")[0] for line in skipped] == [f"{table}:{n + 1}", f"{table}:{n + 2}", f"{table}:{n + 3}"]
    assert "file img/cat/gone.png not found" in skipped[0] and "not JSON" in skipped[1]
    assert "not a JSON object" in skipped[2]
    ev = run_cli("eval", tmp_path / "run", "--split", "val")  # reads the table as the run did
    assert ev.returncode == 0, ev.stderr
    (tmp_path / "labels.jsonl").write_bytes(b"\xff" + table.read_bytes())
    proc = run_cli("train", "--data", table, *TINY, "--out", tmp_path / "r2")
    assert proc.returncode == 2 and f"line 1 of {table} (the header) is not UTF-8 text" in proc.stderr


def test_outside_paths_with_the_flag(cifar_csv, tmp_path):
    (tmp_path / "tables").mkdir()
    table = tmp_path / "tables" / "labels.tsv"
    table.write_text("path\tlabel\n" + "".join(f"{cifar_csv / 'train' / c / f.name}\t{c}\n"
                                               for c in ("airplane", "cat", "ship")
                                               for f in sorted((cifar_csv / "train" / c).iterdir())[:6]))
    proc = run_cli("train", "--data", table, *TINY, "--out", tmp_path / "r1")
    assert proc.returncode == 2 and "18 bad row(s)" in proc.stderr and "--allow-outside-paths" in proc.stderr
    proc = run_cli("train", "--data", table, *TINY, "--out", tmp_path / "r2", "--allow-outside-paths")
    assert proc.returncode == 0, proc.stderr


def test_resume_on_an_edited_label_file_is_refused_naming_the_file(cifar_csv, tmp_path):
    table = _table(tmp_path, cifar_csv, ["path,label", *_good_rows(cifar_csv)])
    out = tmp_path / "run"
    assert run_cli("train", "--data", table, *TINY, "--out", out).returncode == 0
    lines = table.read_text().splitlines()
    moved = lines[1].split(",")[0]  # an airplane relabelled as a ship
    table.write_text("\n".join([lines[0], f"{moved},ship", *lines[2:]]) + "\n")
    proc = run_cli("train", "--resume", out, "--epochs", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"changed in {table} since the run started (first: {moved}, line 2 of labels.csv)" in proc.stderr, \
        proc.stderr


def test_a_row_given_twice_is_kept_once_and_said(cifar_csv, tmp_path):
    rows = _good_rows(cifar_csv)
    table = _table(tmp_path, cifar_csv, ["path,label", *rows, rows[4]])
    proc = run_cli("train", "--data", table, *TINY, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert f"line {len(rows) + 2} repeats line 6 (same file, label and split): kept once" in proc.stderr
    assert f"{table}: {len(rows)} rows, 3 classes" in proc.stderr


def test_leakage_across_the_split_column_is_found_and_deduped(cifar_csv, tmp_path):
    rows = _good_rows(cifar_csv)
    first = rows[0].split(",")[0]
    table = _table(tmp_path, cifar_csv, ["path,label,split", *(r + ",train" for r in rows)])
    (tmp_path / "copy.jpg").write_bytes((tmp_path / first).read_bytes())  # a training image under another name
    tests = [f"img/{c}/{f.name},{c},test" for c in ("airplane", "cat", "ship")
             for f in sorted((cifar_csv / "train" / c).iterdir())[6:8]]
    table.write_text(table.read_text() + "\n".join(["copy.jpg,airplane,test", *tests]) + "\n")
    warned = run_cli("train", "--data", table, *TINY, "--out", tmp_path / "r1")
    assert warned.returncode == 0, warned.stderr
    assert "1 of 7 test images are byte-for-byte copies of training images" in warned.stderr
    assert f"{first} = copy.jpg" in warned.stderr, warned.stderr
    deduped = run_cli("train", "--data", table, *TINY, "--out", tmp_path / "r2", "--dedupe")
    assert deduped.returncode == 0 and "--dedupe: dropped 1 of 7 test images" in deduped.stderr, deduped.stderr


def test_labels_as_a_json_list_or_split_on_semicolons_and_a_duplicate_with_another_set(cifar_csv, tmp_path):
    from transferkit.data.preprocess import Preprocessing
    from transferkit.data.sources import load_source
    from transferkit.errors import TransferkitError

    def load(table: Path):
        return load_source(str(table), preprocessing=Preprocessing(32, 32), splits=("train",), use_cache=False,
                           workers=1)

    paths = [r.split(",")[0] for r in _good_rows(cifar_csv, 2)]  # airplane, airplane, cat, cat, ship, ship
    table = _table(tmp_path, cifar_csv, [
        json.dumps({"path": paths[0], "labels": ["airplane", " sky "]}),
        json.dumps({"path": paths[2], "labels": "cat; ;pet"}),
        json.dumps({"path": paths[4], "labels": ["ship"]}),
        json.dumps({"path": paths[2], "labels": ["pet", "cat"]}),  # the same set again: kept once
    ], name="labels.jsonl")
    src = load(table)
    assert src.multilabel and src.classes == ["airplane", "cat", "pet", "ship", "sky"]
    assert src.train.labels.tolist() == [[1, 0, 0, 0, 1], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0]]
    table.write_text(table.read_text() + json.dumps({"path": paths[2], "labels": "cat"}) + "\n")
    with pytest.raises(TransferkitError, match=f"line 5: file {paths[2].split('/')[-1]} has label 'cat' \\(train\\) "
                                               "here and 'cat;pet' \\(train\\) on line 2"):
        load(table)
    both = tmp_path / "both.csv"
    both.write_text(f"path,label,labels\n{paths[0]},airplane,airplane\n")
    with pytest.raises(TransferkitError, match="has both a 'label' and a 'labels' column; keep one"):
        load(both)
