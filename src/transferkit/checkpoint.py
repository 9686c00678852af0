"""Run-folder files: weights as safetensors + JSON metadata, the resumable last checkpoint.

Every file is written to a temporary name and renamed, so a crash leaves the previous file.
Nothing here unpickles: safetensors for weights, torch.load(weights_only=True) for the rest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from .errors import TransferkitError

MODEL_FILE = "model.safetensors"
META_FILE = "model.json"
LAST_FILE = "last.pt"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` via a temporary file in the same folder and an atomic rename.

    A crash or a full disk midway leaves the previous file as it was, and no temporary file.
    """
    path = Path(path)
    view = memoryview(data.encode() if isinstance(data, str) else data)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a run folder is meant to be shared
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise TransferkitError(
            f"could not write {path}: {e.strerror or e}; the previous {path.name} is untouched. "
            "Free some space (or fix the folder's permissions) and resume with --resume"
        ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(run_dir: Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Write model.safetensors and model.json (with the weights' sha256)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    raw = save(state)
    atomic_write(run_dir / MODEL_FILE, raw)
    meta = dict(meta, sha256=hashlib.sha256(raw).hexdigest())
    atomic_write(run_dir / META_FILE, json.dumps(meta, indent=2))


def read_meta(run_dir: Path) -> dict[str, Any]:
    """model.json of a run folder, with a clear error when the folder is not a run."""
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        raise TransferkitError(
            f"'{run_dir}' is not a transferkit run folder (no {META_FILE}); "
            "pass the --out folder of a finished 'transferkit train'"
        )
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TransferkitError(f"{path} is damaged ({e}); retrain or restore it") from None


def load_model_state(run_dir: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The run's weights, checked against the sha256 in model.json."""
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise TransferkitError(f"{path} is missing; the run did not finish saving a model")
    raw = path.read_bytes()
    if meta.get("sha256") and hashlib.sha256(raw).hexdigest() != meta["sha256"]:
        raise TransferkitError(
            f"{path} does not match the checksum in {META_FILE}: the file is truncated or was "
            "altered; restore it from a backup or retrain"
        )
    return load_file(str(path))


def save_last(run_dir: Path, state: dict[str, Any]) -> None:
    """The resumable checkpoint: plain tensors and JSON-able values only."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(Path(run_dir) / LAST_FILE, buf.getvalue())


def load_last(run_dir: Path) -> dict[str, Any]:
    """Read last.pt with weights_only=True: a file that would run code is refused."""
    path = Path(run_dir) / LAST_FILE
    if not path.is_file():
        raise TransferkitError(f"nothing to resume in '{run_dir}': no {LAST_FILE}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TransferkitError(f"cannot read {path}: {type(e).__name__}: {e}") from None
