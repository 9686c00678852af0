"""Label files: a table (CSV, TSV or JSON lines) that names each image's file, label(s) and split.

The table turns into the same splits as class folders: its classes are the sorted set of its
labels (as folder names sort) and each split lists its files by class, then path, so a label
file and the same images laid out as class folders train alike.

A cell may name several labels, separated by ';' (a JSON lines `labels` may be a list). A table
where a row carries several is multi-label (task "auto"; "multilabel" makes it so for any table):
its splits hold multi-hot rows (N, C), listed by path, and a row may carry no label at all.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import TransferkitError
from .folders import load_listed
from .preprocess import Preprocessing
from .splits import DataSource, LabelList, label_counts

log = logging.getLogger(__name__)

DELIMITERS = {".csv": ",", ".tsv": "\t", ".jsonl": None}
REQUIRED = ("path", "label")
LABEL_COLUMNS = ("label", "labels")  # either names an image's label(s)
LABEL_DELIMITER = ";"
TASKS = ("auto", "single", "multilabel")
SPLITS = ("train", "val", "test")
SHOWN = 3  # bad rows quoted in the error; all of them are counted (and listed in skipped.txt)
OUTSIDE_FLAG = "--allow-outside-paths"


def is_label_file(data: str | Path) -> bool:
    """Whether --data names a label file (by its suffix)."""
    return Path(data).suffix.lower() in DELIMITERS


@dataclass
class Row:
    line: int
    path: str  # normalised, absolute
    labels: tuple[str, ...]  # sorted, distinct; one in a single-label table, any in multi-label
    split: str

    @property
    def shown(self) -> str:
        return LABEL_DELIMITER.join(self.labels)


@dataclass
class Table:
    rows: list[Row]
    bad: list[tuple[int, str]]  # (line, why)
    has_split: bool
    multilabel: bool = False
    several: int = 0  # rows whose cell names more than one label


def split_labels(cell: str | list[Any]) -> tuple[str, ...]:
    """The labels of a cell: split on ';' (or a JSON list's items), stripped, empty parts dropped,
    sorted and each once."""
    parts = cell if isinstance(cell, list) else cell.split(LABEL_DELIMITER)
    return tuple(sorted({str(p).strip() for p in parts if p is not None} - {""}))


def read_table(table: Path, *, allow_outside: bool = False, task: str = "auto") -> Table:
    """The table's good rows and its bad ones (line, why); a table whose header or encoding
    cannot be read is refused at once. `task`: "auto" reads it as multi-label when any row's
    cell names several labels, "single" makes such rows bad ones, "multilabel" reads every row
    multi-label."""
    try:
        raw = table.read_bytes()
    except OSError as e:
        raise TransferkitError(f"label file {table} could not be read ({e.strerror or e}); "
                               "check its path and permissions") from None
    bad: list[tuple[int, str]] = []
    lines = _decoded_lines(table, raw.removeprefix(b"\xef\xbb\xbf"), bad)
    records = list(_records(table, lines, bad))
    if not records:
        raise TransferkitError(f"label file {table} is empty; its first line names the columns "
                               "path,label (and optionally split)")
    has_split, column = _check_header(table, records[0][1])
    several = sum(len(split_labels(r.get(column, ""))) > 1 for _, r in records[1:])
    multilabel = task == "multilabel" or (task == "auto" and several > 0)
    base = os.path.normpath(os.path.abspath(table.parent))
    rows: dict[str, Row] = {}
    for line, record in records[1:]:
        row = _row(line, record, column, (base, allow_outside, multilabel), bad)
        if row is not None:
            _add(row, rows, bad)
    return Table(sorted(rows.values(), key=lambda r: r.line), sorted(bad), has_split, multilabel,
                 several)


def _decoded_lines(table: Path, raw: bytes, bad: list[tuple[int, str]]) -> list[str]:
    """The table's lines as text; a line that is not UTF-8 is a bad row (and reads empty)."""
    lines = []
    for i, chunk in enumerate(raw.split(b"\n"), 1):
        try:
            text = chunk.decode("utf-8").rstrip("\r")
            if "\r" in text:  # csv reads a carriage return inside a line as a broken row
                if i == 1:
                    raise TransferkitError(f"line 1 of {table} holds a carriage return (\\r) "
                                           "inside it (an old Mac line ending?); save the table "
                                           "with \\n or \\r\\n line endings")
                bad.append((i, "a carriage return (\\r) inside the line; save the table with "
                               "\\n or \\r\\n line endings"))
                text = ""
            lines.append(text + "\n")
        except UnicodeDecodeError as e:
            if i == 1:
                raise TransferkitError(f"line 1 of {table} (the header) is not UTF-8 text (byte 0x"
                                       f"{chunk[e.start]:02x} at column {e.start + 1}); save the "
                                       "table as UTF-8") from None
            bad.append((i, f"not UTF-8 text (byte 0x{chunk[e.start]:02x} at column "
                           f"{e.start + 1}); save the table as UTF-8"))
            lines.append("\n")
    return lines


def _records(table: Path, lines: list[str],
             bad: list[tuple[int, str]]) -> Iterator[tuple[int, dict[str, Any] | list[str]]]:
    """(line, record) for each non-empty line: the header first (its column names), then the
    rows as {column: value}."""
    delimiter = DELIMITERS[table.suffix.lower()]
    if delimiter is None:
        yield from _json_records(lines, bad)
        return
    reader = csv.reader(iter(lines), delimiter=delimiter)
    header: list[str] | None = None
    for values in reader:
        if not any(v.strip() for v in values):
            continue
        if header is None:
            header = [v.strip().lower() for v in values]
            yield reader.line_num, header
            continue
        values = [v.strip() for v in values] + [""] * (len(header) - len(values))  # a short row
        yield reader.line_num, dict(zip(header, values))


def _json_records(lines: list[str],
                  bad: list[tuple[int, str]]) -> Iterator[tuple[int, dict[str, Any] | list[str]]]:
    first = True
    for line, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            bad.append((line, f"not JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            bad.append((line, "not a JSON object"))
            continue
        record = {str(k).strip().lower(): _json_value(str(k).strip().lower(), v)
                  for k, v in obj.items()}
        if first:
            first = False
            yield line, list(record)
        yield line, record


def _json_value(key: str, value: Any) -> str | list[Any]:
    """A JSON field as the table reads it: text, or a list of labels as it is."""
    if isinstance(value, list) and key in LABEL_COLUMNS:
        return value
    return "" if value is None else str(value).strip()


def _list_problem(cell: str | list[Any]) -> str | None:
    """Why a JSON list of labels cannot be read (an item that is not text, or holds the ';' that
    separates labels), or None."""
    if not isinstance(cell, list):
        return None
    for i, item in enumerate(cell, 1):
        if not isinstance(item, str):
            return f"item {i} of the labels list is {json.dumps(item)[:40]}, not text"
        if LABEL_DELIMITER in item:
            return (f"label {item[:40]!r} holds '{LABEL_DELIMITER}', which separates labels; "
                    "rename it")
    return None


def _check_header(table: Path, header: list[str]) -> tuple[bool, str]:
    """Refuse a header without path and label(s) (saying which column looks meant): whether the
    table has a split column, and which column names the labels."""
    if all(c in header for c in LABEL_COLUMNS):
        raise TransferkitError(f"{table} has both a 'label' and a 'labels' column; keep one "
                               f"(either may name several labels an image, separated by "
                               f"'{LABEL_DELIMITER}')")
    column = "labels" if "labels" in header else "label"
    unknown = [c for c in header if c not in ("path", column, "split")]
    for name in (*REQUIRED, "split"):
        close = difflib.get_close_matches(name, unknown, n=1, cutoff=0.6 if name != "split"
                                          else 0.75)
        present = name in header or (name == "label" and column in header)
        if not present and (close or name in REQUIRED):
            said = f"; is '{close[0]}' meant to be '{name}'? rename it" if close else (
                "; its first line must name the columns path,label (and optionally split)")
            raise TransferkitError(f"{table} has no '{name}' column (line 1 reads "
                                   f"{','.join(header)!r}){said}")
    if unknown:
        log.info("%s: columns %s are not read (only path, label or labels, split)", table,
                 ", ".join(unknown))
    return "split" in header, column


def _row(line: int, record: dict[str, Any] | list[str], column: str,
         how: tuple[str, bool, bool], bad: list[tuple[int, str]]) -> Row | None:
    """The row on `line`, or None with why in `bad` (`how`: the table's folder, whether paths
    outside it are allowed, whether the table is multi-label)."""
    assert isinstance(record, dict)
    base, allow_outside, multilabel = how
    path, split = record.get("path", ""), record.get("split", "")
    listed = _list_problem(record.get(column, ""))
    labels = split_labels(record.get(column, ""))
    full = os.path.normpath(os.path.join(base, path))
    inside = os.path.commonpath([full, base]) == base
    why = ("empty path" if not path else
           listed if listed else
           "empty label" + (" (an image with none of the labels: pass --task multilabel)"
                            if column == "labels" else "") if not labels and not multilabel else
           f"carries {len(labels)} labels ({LABEL_DELIMITER.join(labels)}); single-label task "
           "(--task auto or multilabel reads it)" if len(labels) > 1 and not multilabel else
           "empty split (train, val or test)" if "split" in record and not split else
           f"split '{split}' is not train, val or test" if "split" in record
           and split not in SPLITS else
           f"path {path} is outside {base} (pass {OUTSIDE_FLAG} to allow it)"
           if not inside and not allow_outside else
           f"path {path} is a folder, not an image file" if os.path.isdir(full) else
           f"file {path} not found" if not os.path.isfile(full) else None)
    if why is not None:
        bad.append((line, why))
        return None
    return Row(line, full, labels, split or "train")


def _add(row: Row, rows: dict[str, Row], bad: list[tuple[int, str]]) -> None:
    """Add `row`, unless its path came before: kept once with the same label and split, both left
    out (bad rows) with another."""
    first = rows.get(row.path)
    if first is None:
        rows[row.path] = row
    elif (first.labels, first.split) == (row.labels, row.split):
        log.info("line %d repeats line %d (same file, label and split): kept once", row.line,
                 first.line)
    else:
        del rows[row.path]
        shown = os.path.basename(row.path)
        said = f"labels '{row.shown}'" if len(row.labels) != 1 else f"label '{row.shown}'"
        bad.append((row.line, f"file {shown} has {said} ({row.split}) here and "
                              f"'{first.shown}' ({first.split}) on line {first.line}"))
        bad.append((first.line, f"file {shown} is given again on line {row.line} with another "
                                "label or split"))


def check_rows(table: Path, read: Table, skip: bool) -> list[tuple[str, str]]:
    """Refuse a table with bad rows, naming the first ones (or, with `skip`, the rows left out
    as skipped.txt lists them: (table:line, why))."""
    if read.bad and not skip:
        quoted = "; ".join(f"line {line}: {why}" for line, why in read.bad[:SHOWN])
        more = f"; and {len(read.bad) - SHOWN} more" if len(read.bad) > SHOWN else ""
        raise TransferkitError(f"{table} has {len(read.bad)} bad row(s): {quoted}{more}; fix "
                               "them, or pass --skip-bad-rows to leave them out (listed in "
                               "skipped.txt)")
    if read.bad:
        log.warning("%s: left out %d bad row(s) (--skip-bad-rows), listed in skipped.txt, e.g. "
                    "line %d: %s", table, len(read.bad), *read.bad[0])
    return [(f"{table}:{line}", why) for line, why in read.bad]


def row_of(data: str, path: str) -> str:
    """Where a label file names `path` (relative to its folder): ", line N of labels.csv", or
    nothing (a folder, or a row that is gone)."""
    table = Path(data).expanduser()
    if not is_label_file(table) or not table.is_file():
        return ""
    full = os.path.normpath(os.path.abspath(table.parent / path))
    lines = [r.line for r in read_table(table, allow_outside=True).rows if r.path == full]
    return f", line {lines[0]} of {table.name}" if lines else ""


def table_splits(table: Path) -> list[str]:
    """The splits a label file lays out (train, and val/test where its split column names them)."""
    found = {r.split for r in read_table(table, allow_outside=True).rows} | {"train"}
    return [s for s in SPLITS if s in found]


def load_label_file(table: Path, pre: Preprocessing, splits: Sequence[str], *,
                    task: str = "auto", skip_bad_rows: bool = False, allow_outside: bool = False,
                    **loading) -> DataSource:
    """The splits a label file names (see load_source; `task` as read_table takes it; `loading`:
    workers, max_train, seed, use_cache, stream as folders.load_listed takes them)."""
    read = read_table(table, allow_outside=allow_outside, task=task)
    skipped = check_rows(table, read, skip_bad_rows)
    if not read.rows:
        raise TransferkitError(f"{table} names no images; add rows path,label")
    classes = sorted({label for r in read.rows for label in r.labels})
    if not classes:
        raise TransferkitError(f"no row of {table} carries a label; name each image's labels in "
                               f"its labels column, separated by '{LABEL_DELIMITER}'")
    lists = _split_lists(read, classes, splits)
    _check_trained(table, classes, lists.get("train"), read.multilabel)
    out = DataSource(name=str(table), classes=classes, skipped=skipped,
                     multilabel=read.multilabel)
    log.info("%s: %d rows, %d %s%s", table, len(read.rows), len(classes),
             "labels" if read.multilabel else "classes",
             "" if read.has_split else " (no split column: all train)")
    if read.multilabel:
        _say_multilabel(table, read, task)
    return load_listed(out, dict.fromkeys(lists, table), lists, pre, **loading)


def _split_lists(read: Table, classes: list[str],
                 splits: Sequence[str]) -> dict[str, tuple[list[Path], LabelList]]:
    """{split: (files, labels)}: single-label by class, then path (as class folders list them),
    with class indices; multi-label by path, with multi-hot rows."""
    index = {c: i for i, c in enumerate(classes)}
    lists: dict[str, tuple[list[Path], LabelList]] = {}
    for split in (s for s in SPLITS if s in splits):
        mine = [r for r in read.rows if r.split == split]
        if not mine:
            continue
        if read.multilabel:
            mine.sort(key=lambda r: r.path)
            hot = [[int(c in r.labels) for c in classes] for r in mine]
            lists[split] = ([Path(r.path) for r in mine], hot)
        else:
            pairs = sorted((index[r.labels[0]], r.path) for r in mine)
            lists[split] = ([Path(p) for _, p in pairs], [c for c, _ in pairs])
    return lists


def _check_trained(table: Path, classes: list[str],
                   train: tuple[list[Path], LabelList] | None, multilabel: bool) -> None:
    """Every class (every label) needs a training image (one that carries it)."""
    if train is None:
        return
    counts = label_counts(torch.tensor(train[1], dtype=torch.int64), len(classes)).tolist()
    untrained = [c for c, n in zip(classes, counts) if n == 0]
    if untrained and multilabel:
        raise TransferkitError(f"{table}: label(s) {', '.join(untrained)} are on no train row; a "
                               "label needs training images that carry it: add rows, or drop "
                               "those labels")
    if untrained:
        raise TransferkitError(f"{table}: label(s) {', '.join(untrained)} have no train rows; "
                               "a class needs training images: add rows, or drop those labels")


def _say_multilabel(table: Path, read: Table, task: str) -> None:
    """One line: the table is read as multi-label, and why."""
    none = sum(not r.labels for r in read.rows)
    unlabelled = f"; {none} rows carry no label (images showing none of them)" if none else ""
    if task == "multilabel":
        log.info("%s: multi-label task (--task multilabel, sigmoid head): %d rows carry several "
                 "labels%s", table.name, read.several, unlabelled)
    else:
        log.info("%s: %d rows carry several labels: multi-label task (sigmoid head); pass --task "
                 "single to refuse such rows%s", table.name, read.several, unlabelled)
