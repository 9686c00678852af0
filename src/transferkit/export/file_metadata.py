"""The metadata an export carries: the Preprocessing and ModelCard, in the file and export.json.

The run's `Preprocessing` itself (its to_dict) and `ModelCard` itself (its to_json) travel with
the class names as ONNX `metadata_props` or TorchScript `_extra_files`; `preprocessing_of` and
`card_of` read them back. export.json beside the file records each export.

An ONNX file also carries its own checksum (`seal`, checked by `verify`): the entry
`transferkit_sha256` holds the sha256 of every byte of the file except that entry itself (a file
cannot hold the hash of its whole self). The entry is appended last, as protobuf allows a repeated
field to be, so the bytes it covers are exactly the bytes written: the graph, the weights, the
other metadata (classes, preprocessing, temperature), whatever reads and re-serializes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import runfiles
from ..checkpoint import ModelCard
from ..data.preprocess import Preprocessing
from ..errors import TransferkitError
from ..files import atomic_write
from ..version import __version__

log = logging.getLogger(__name__)

EXPORT_FILE = runfiles.EXPORT
EXTRA_FILE = "transferkit.json"  # TorchScript: the metadata, in the file's extra files
PREPROCESSING_KEY = "preprocessing"  # the metadata entry that holds Preprocessing.to_dict() as JSON
CARD_KEY = "model_card"  # the metadata entry that holds a run's ModelCard.to_json(), model.json
CHECKSUM_KEY = "transferkit_sha256"  # sha256 of the ONNX file's bytes without this entry
_OPSET_FIELD, _METADATA_FIELD = 8, 14  # ModelProto.opset_import, .metadata_props in onnx.proto


def metadata(classes: Sequence[str], pre: Preprocessing, *, temperature: float = 1.0,
             card: ModelCard | None = None, source: str = "", task: str | None = None,
             thresholds: Sequence[float] | None = None) -> dict[str, str]:
    """What a consumer needs besides the graph, as the string pairs ONNX metadata_props holds.

    `preprocessing` is the Preprocessing itself (to_dict, as JSON) and `model_card` a run's
    ModelCard itself (to_json, as model.json holds it, with the classes, preprocessing and
    temperature exported): the entries transferkit reads back. The fields a consumer needs are
    also entries of their own (a number or a name as text, a list as JSON), for readers of single
    keys (earlier transferkit wrote only those). `task`: "multilabel" for a sigmoid per label,
    each answered at its `thresholds` entry (None: 0.5 each), recorded as `task` and `thresholds`;
    None: the card's task and thresholds (no card: one class per image).
    """
    if task is None:
        task, thresholds = (card.task, card.thresholds) if card is not None else ("single", None)
    rule = pre.to_dict()
    side = pre.image_size
    if card is not None:
        card = card.replace(classes=list(classes), preprocessing=pre, temperature=temperature,
                            task=task, thresholds=None if thresholds is None else list(thresholds))
    return {
        "transferkit_version": __version__,
        "classes": json.dumps(list(classes)),
        "input": f"uint8 RGB images, N x 3 x {side} x {side} (NCHW); /255, mean and std are inside "
                 "the graph",
        **_answers(task, thresholds, len(classes)),
        PREPROCESSING_KEY: json.dumps(rule),
        **{k: v if isinstance(v, str) else json.dumps(v) for k, v in rule.items()},
        "crop": "center",
        "resize": f"shorter side to {pre.resize_size} px ({pre.interpolation}, antialiased), then "
                  f"a center crop of {side} x {side}; a square image no larger than {side} px is "
                  "instead upsampled whole (bilinear, no antialiasing, rounded to uint8)",
        "temperature": repr(float(temperature)),
        "weights_sha256": (card.sha256 if card is not None else None) or "",
        "source": source,
        **({CARD_KEY: card.to_json()} if card is not None else {}),
    }


def _answers(task: str, thresholds: Sequence[float] | None, count: int) -> dict[str, str]:
    """The `output`, `task` (and, multi-label, `thresholds`) entries: how logits become answers."""
    if task != "multilabel":
        return {"output": "logits (N x classes); probabilities are softmax(logits / temperature)",
                "task": "single"}
    from ..report.multilabel import DEFAULT_THRESHOLD

    cut = [DEFAULT_THRESHOLD] * count if thresholds is None else [float(t) for t in thresholds]
    return {"output": "logits (N x labels); each label's probability is sigmoid(logit), and the "
                      "label is answered when it is >= the label's entry in thresholds",
            "task": "multilabel", "thresholds": json.dumps(cut)}


def answering(meta: dict[str, str]) -> tuple[str, list[float] | None]:
    """(task, thresholds) that a file's metadata records: a file without a `task` entry (earlier
    transferkit) answers one class per image."""
    if meta.get("task", "single") != "multilabel":
        return "single", None
    return "multilabel", [float(t) for t in json.loads(meta["thresholds"])]


def preprocessing_of(meta: dict[str, str]) -> Preprocessing:
    """The Preprocessing that a file's transferkit metadata holds.

    A file written before the metadata held it whole names its fields one by one and no
    interpolation: it was bilinear."""
    if PREPROCESSING_KEY in meta:
        return Preprocessing.from_dict(json.loads(meta[PREPROCESSING_KEY]))
    fields = ("image_size", "resize_size", "mean", "std")
    return Preprocessing.from_dict({k: json.loads(meta[k]) for k in fields})


def card_of(meta: dict[str, str]) -> ModelCard | None:
    """The run's ModelCard that a file's transferkit metadata holds; None for a file without one
    (a model exported without a run, or by transferkit before the metadata held the card)."""
    return ModelCard.from_json(meta[CARD_KEY]) if CARD_KEY in meta else None


def set_onnx_metadata(path: Path, meta: dict[str, str]) -> None:
    """Replace the metadata_props of the ONNX file at `path` by `meta`."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))


def copy_metadata(src: Path, dst: Path, extra: dict[str, str]) -> None:
    """Give the ONNX file `dst` the metadata of `src`, with `extra` entries added."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(src)).metadata_props}
    set_onnx_metadata(dst, {**meta, **extra})


def record(target: Path, rec: dict[str, Any]) -> None:
    """Add this export to export.json beside the file (one entry per file name)."""
    path = target.parent / EXPORT_FILE
    try:
        existing = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(existing, dict):
            existing = {}
    except (OSError, ValueError):
        existing = {}
    existing[target.name] = rec
    atomic_write(path, json.dumps(existing, indent=2))


def _varint(raw: bytes, i: int) -> tuple[int, int]:
    """The protobuf varint at `raw[i:]` and the index after it."""
    value = shift = 0
    while True:
        if i >= len(raw) or shift > 63:
            raise ValueError("a truncated varint")
        b = raw[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def _fields(raw: bytes) -> Iterator[tuple[int, int, int, bytes | None]]:
    """The top-level fields of a protobuf message: (field number, start, end, its bytes when
    length-delimited)."""
    i = 0
    while i < len(raw):
        start = i
        tag, i = _varint(raw, i)
        kind = tag & 7
        body = None
        if kind == 0:
            _, i = _varint(raw, i)
        elif kind in (1, 5):
            i += 8 if kind == 1 else 4
        elif kind == 2:
            size, i = _varint(raw, i)
            body, i = raw[i:i + size], i + size
        else:
            raise ValueError(f"wire type {kind}")
        if i > len(raw):
            raise ValueError("a truncated field")
        yield tag >> 3, start, i, body


def _entry(key: str, value: str) -> bytes:
    """A ModelProto.metadata_props entry (StringStringEntryProto: 1 key, 2 value), encoded."""
    def field(number: int, data: bytes) -> bytes:
        return _encode_varint(number << 3 | 2) + _encode_varint(len(data)) + data

    return field(_METADATA_FIELD, field(1, key.encode()) + field(2, value.encode()))


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _checksum_in(number: int, body: bytes | None) -> str | None:
    """The value of a top-level field that is the checksum entry, else None."""
    if number != _METADATA_FIELD or body is None:
        return None
    entry = {n: b for n, _, _, b in _fields(body)}
    if entry.get(1) != CHECKSUM_KEY.encode():
        return None
    return (entry.get(2) or b"").decode("ascii", "replace")


def checksums(raw: bytes) -> tuple[str | None, str]:
    """(the checksum the file records, the sha256 of its bytes without that entry)."""
    digest, recorded = hashlib.sha256(), None
    for number, start, end, body in _fields(raw):
        value = _checksum_in(number, body)
        if value is None:
            digest.update(raw[start:end])
        else:
            recorded = value
    return recorded, digest.hexdigest()


def opset_of(raw: bytes) -> int | None:
    """The default-domain (ai.onnx) opset the ONNX file `raw` declares, read from its bytes."""
    for number, _, _, body in _fields(raw):
        if number != _OPSET_FIELD or body is None:
            continue
        domain, version = b"", None  # OperatorSetIdProto: 1 domain, 2 version (a varint)
        for n, start, _, value in _fields(body):
            if n == 1:
                domain = value or b""
            elif n == 2:
                version = _varint(body, _varint(body, start)[1])[0]
        if domain in (b"", b"ai.onnx") and version is not None:
            return version
    return None


def seal(raw: bytes) -> bytes:
    """The ONNX file `raw` with its checksum entry appended (one it held before is dropped)."""
    kept = b"".join(raw[start:end] for number, start, end, body in _fields(raw)
                    if _checksum_in(number, body) is None)
    return kept + _entry(CHECKSUM_KEY, hashlib.sha256(kept).hexdigest())


def verify(raw: bytes, name: str | Path) -> bool:
    """Check the ONNX file `raw` (named `name`) against the checksum it carries: a file that
    differs is refused; True when checked, False (said in one line) when it carries none."""
    try:
        recorded, actual = checksums(raw)
    except ValueError as e:
        raise TransferkitError(f"{name} is not a readable ONNX model ({e}): the file is "
                               "truncated or damaged; export it again with 'transferkit export "
                               "RUN'") from None
    if recorded is None:
        log.warning("%s carries no checksum (an earlier transferkit exported it): its contents "
                    "cannot be checked; export it again to add one", name)
        return False
    if recorded != actual:
        raise TransferkitError(f"{name} does not match the checksum it was exported with (its "
                               f"{CHECKSUM_KEY}): the file was damaged or changed since; export "
                               "the run again")
    return True
