"""Writing run-folder and cache files atomically:
a crash or a full disk leaves the previous file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import TransferkitError


def umask() -> int:
    """This process's umask now (read from /proc where it can be, without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` via a temporary file in the same folder and an atomic rename.

    A crash or a full disk midway leaves the previous file as it was, and no temporary file.
    """
    path = Path(path)
    view = memoryview(data.encode() if isinstance(data, str) else data)
    existed = path.exists()
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise TransferkitError(f"could not write {path}: {e.strerror or e}; the folder "
                               f"{path.parent} takes no new files (full, read-only or missing); "
                               "nothing in it was changed") from None
    try:
        try:
            # mkstemp makes 0600; a run folder is meant to be shared
            os.fchmod(fd, 0o666 & ~umask())
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        kept = (f"the previous {path.name} is untouched" if existed
                else f"no {path.name} was written")
        resume = (" (or, to continue the training run there from its last.pt: "
                  f"transferkit train --resume {path.parent})"
                  if (path.parent / "last.pt").is_file() else "")
        raise TransferkitError(
            f"could not write {path}: {e.strerror or e}; {kept}. Free some space or fix the "
            f"folder's permissions, then run the command again{resume}"
        ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temp_beside(path: Path, flag: str, example: str) -> tuple[int, str]:
    """A new temporary file beside the file `path` that `flag` (e.g. --out) names, open (fd, name),
    for writing it and renaming it onto `path` once complete; a folder, a missing or unwritable
    folder is a sentence that names `flag` (`example`: a file name to suggest, e.g. model.onnx)."""
    path = Path(path)
    if path.is_dir():
        raise TransferkitError(f"{flag} {path} is a folder; name a file, e.g. {path / example}")
    folder = path.parent
    if not folder.is_dir():
        raise TransferkitError(f"{flag} {path}: the folder {folder} does not exist; "
                               "create it or write elsewhere")
    try:
        return tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise TransferkitError(f"{flag} {path}: cannot write into {folder} ({e.strerror or e}); "
                               f"pick a writable folder with {flag}") from None
