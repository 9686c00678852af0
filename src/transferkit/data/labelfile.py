"""Label files: a table (CSV, TSV or JSON lines) that names each image's file, label and split.

The table turns into the same splits as class folders: its classes are the sorted set of its
labels (as folder names sort) and each split lists its files by class, then path, so a label
file and the same images laid out as class folders train alike.
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

from ..errors import TransferkitError
from .folders import load_listed
from .preprocess import Preprocessing
from .splits import DataSource

log = logging.getLogger(__name__)

DELIMITERS = {".csv": ",", ".tsv": "\t", ".jsonl": None}
REQUIRED = ("path", "label")
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
    label: str
    split: str


@dataclass
class Table:
    rows: list[Row]
    bad: list[tuple[int, str]]  # (line, why)
    has_split: bool


def read_table(table: Path, *, allow_outside: bool = False) -> Table:
    """The table's good rows and its bad ones (line, why); a table whose header or encoding
    cannot be read is refused at once."""
    try:
        raw = table.read_bytes()
    except OSError as e:
        raise TransferkitError(f"label file {table} could not be read ({e.strerror or e}); "
                               "check its path and permissions") from None
    bad: list[tuple[int, str]] = []
    lines = _decoded_lines(table, raw.removeprefix(b"\xef\xbb\xbf"), bad)
    records = _records(table, lines, bad)
    header = next(records, None)
    if header is None:
        raise TransferkitError(f"label file {table} is empty; its first line names the columns "
                               "path,label (and optionally split)")
    has_split = _check_header(table, header[1])
    base = os.path.normpath(os.path.abspath(table.parent))
    rows: dict[str, Row] = {}
    for line, record in records:
        row = _row(line, record, base, allow_outside, bad)
        if row is not None:
            _add(row, rows, bad)
    return Table(sorted(rows.values(), key=lambda r: r.line), sorted(bad), has_split)


def _decoded_lines(table: Path, raw: bytes, bad: list[tuple[int, str]]) -> list[str]:
    """The table's lines as text; a line that is not UTF-8 is a bad row (and reads empty)."""
    lines = []
    for i, chunk in enumerate(raw.split(b"\n"), 1):
        try:
            lines.append(chunk.decode("utf-8").rstrip("\r") + "\n")
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
             bad: list[tuple[int, str]]) -> Iterator[tuple[int, dict[str, str] | list[str]]]:
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
                  bad: list[tuple[int, str]]) -> Iterator[tuple[int, dict[str, str] | list[str]]]:
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
        record = {str(k).strip().lower(): "" if v is None else str(v).strip()
                  for k, v in obj.items()}
        if first:
            first = False
            yield line, list(record)
        yield line, record


def _check_header(table: Path, header: list[str]) -> bool:
    """Refuse a header without path and label (saying which column looks meant); whether the
    table has a split column."""
    unknown = [c for c in header if c not in (*REQUIRED, "split")]
    if "labels" in header:
        raise TransferkitError(f"{table} has a 'labels' column (several labels an image): "
                               "multi-label tables are not read yet; name one label an image "
                               "in a 'label' column")
    for name in (*REQUIRED, "split"):
        close = difflib.get_close_matches(name, unknown, n=1, cutoff=0.6 if name != "split"
                                          else 0.75)
        if name not in header and (close or name in REQUIRED):
            said = f"; is '{close[0]}' meant to be '{name}'? rename it" if close else (
                "; its first line must name the columns path,label (and optionally split)")
            raise TransferkitError(f"{table} has no '{name}' column (line 1 reads "
                                   f"{','.join(header)!r}){said}")
    if unknown:
        log.info("%s: columns %s are not read (only path, label, split)", table,
                 ", ".join(unknown))
    return "split" in header


def _row(line: int, record: dict[str, str] | list[str], base: str, allow_outside: bool,
         bad: list[tuple[int, str]]) -> Row | None:
    """The row on `line`, or None with why in `bad`."""
    assert isinstance(record, dict)
    path, label, split = (record.get(k, "") for k in ("path", "label", "split"))
    full = os.path.normpath(os.path.join(base, path))
    inside = os.path.commonpath([full, base]) == base
    why = ("empty path" if not path else
           "empty label" if not label else
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
    return Row(line, full, label, split or "train")


def _add(row: Row, rows: dict[str, Row], bad: list[tuple[int, str]]) -> None:
    """Add `row`, unless its path came before: kept once with the same label and split, both left
    out (bad rows) with another."""
    first = rows.get(row.path)
    if first is None:
        rows[row.path] = row
    elif (first.label, first.split) == (row.label, row.split):
        log.info("line %d repeats line %d (same file, label and split): kept once", row.line,
                 first.line)
    else:
        del rows[row.path]
        shown = os.path.basename(row.path)
        bad.append((row.line, f"file {shown} has label '{row.label}' ({row.split}) here and "
                              f"'{first.label}' ({first.split}) on line {first.line}"))
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
                    skip_bad_rows: bool = False, allow_outside: bool = False,
                    **loading) -> DataSource:
    """The splits a label file names (see load_source; `loading`: workers, max_train, seed,
    use_cache, stream as folders.load_listed takes them)."""
    read = read_table(table, allow_outside=allow_outside)
    skipped = check_rows(table, read, skip_bad_rows)
    if not read.rows:
        raise TransferkitError(f"{table} names no images; add rows path,label")
    classes = sorted({r.label for r in read.rows})
    index = {c: i for i, c in enumerate(classes)}
    lists: dict[str, tuple[list[Path], list[int]]] = {}
    for split in (s for s in SPLITS if s in splits):
        mine = sorted((index[r.label], r.path) for r in read.rows if r.split == split)
        if mine:
            lists[split] = ([Path(p) for _, p in mine], [c for c, _ in mine])
    untrained = sorted(set(classes) - {classes[c] for c in lists.get("train", ([], []))[1]})
    if "train" in lists and untrained:
        raise TransferkitError(f"{table}: label(s) {', '.join(untrained)} have no train rows; "
                               "a class needs training images: add rows, or drop those labels")
    out = DataSource(name=str(table), classes=classes, skipped=skipped)
    log.info("%s: %d rows, %d classes%s", table, len(read.rows), len(classes),
             "" if read.has_split else " (no split column: all train)")
    return load_listed(out, dict.fromkeys(lists, table), lists, pre, **loading)
