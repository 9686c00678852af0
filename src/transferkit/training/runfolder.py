"""The run folder: which settings a run has, whether it starts or resumes, what it may replace."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .. import runfiles
from ..checkpoint import load_last
from ..config import RESUMABLE_CHANGES, TrainConfig, requested_from
from ..data import sources
from ..errors import TransferkitError
from ..files import atomic_write
from ..runtime import Dist
from . import fingerprint

log = logging.getLogger(__name__)

# a resume may name the data's new place: its fingerprint says whether it is the same
MOVABLE = {"data", "data_dir"}
UNCHECKED = RESUMABLE_CHANGES | MOVABLE | {"out"}  # what the settings' fingerprint leaves out


def settings_of(config: TrainConfig | None, resume: str | Path | None,
                settings: dict[str, Any]) -> TrainConfig:
    """The run's settings: a resumed run's own config.yaml (only RESUMABLE_CHANGES may change,
    and --data may point to its moved data folder), or new ones."""
    if resume is not None:
        changed = sorted(set(settings) - RESUMABLE_CHANGES - MOVABLE)
        if changed or config is not None:
            raise TransferkitError(
                "--resume continues a run with its own config.yaml; only "
                f"{', '.join(sorted(RESUMABLE_CHANGES))} may change, and --data may name the new "
                f"place of moved data (not {', '.join(changed) or 'a new config'})"
            )
        if not (Path(resume) / runfiles.CONFIG).is_file():
            raise TransferkitError(f"nothing to resume in '{resume}': no config.yaml "
                                   "(is it a run folder?)")
        return TrainConfig.from_yaml(Path(resume) / "config.yaml", **settings,
                                     out=str(Path(resume).absolute()))
    if config is None:
        return TrainConfig.create(**settings)
    return config.replace(**settings) if settings else config


@dataclass
class RunStart:
    """Rank 0's decision, shared with every process:
    the settings, the folder, the state to resume."""

    cfg: TrainConfig | None = None
    out: str = ""
    saved: dict[str, Any] | None = None  # last.pt's contents when resuming
    error: str | None = None
    # --overwrite: an old run's files go when this run writes its first file
    overwrite: bool = False


@contextlib.contextmanager
def run_folder(cfg: TrainConfig, resume: str | Path | None, overwrite: bool,
               dist: Dist) -> Iterator[RunStart]:
    """Rank 0 prepares the run folder, locks it for the time of the block and reads last.pt; every
    process gets the same RunStart."""
    start, lock, made = RunStart(error="rank 0 did not prepare the run"), None, []
    try:
        if dist.main:
            try:
                cfg, out, resuming, lock, made = _prepare(cfg, resume, overwrite, dist)
                saved = load_last(out) if resuming else None
                if saved is not None:
                    _check_settings(saved, cfg, out)
                start = RunStart(cfg, str(out), saved, overwrite=overwrite and not resuming)
            except TransferkitError as e:
                start = RunStart(error=str(e))
        start = dist.share(start)
        if start.error is not None:
            raise TransferkitError(start.error)
        yield start
    except BaseException:
        _discard(made)
        raise
    finally:
        if lock is not None:
            lock.close()  # the OS releases the lock with the file (and with a killed process)


def _check_settings(saved: dict[str, Any], cfg: TrainConfig, out: Path) -> None:
    """A resume continues with the settings the run started with:
    config.yaml edited since is refused."""
    prints = fingerprint.unpack(saved)
    if prints is None:
        log.warning("%s records no fingerprint of its data and settings (an earlier transferkit "
                    "wrote it): cannot check that they are still the ones the run started with",
                    out / runfiles.LAST)
        return
    fingerprint.check_settings(prints["settings"], fingerprint.settings_record(cfg, UNCHECKED), out)


def _discard(made: list[Path]) -> None:
    """Remove the folders this run created while it wrote nothing in them but what it writes before
    training (lock, log, config.yaml, skipped.txt, split.json): a run that fails before it trains
    leaves nothing behind, and what was there before this run is never removed."""
    if not made:
        return
    try:
        left = {p.name for p in made[0].iterdir()}
        if not left <= runfiles.BEFORE_TRAINING:
            return
        for name in left:
            (made[0] / name).unlink()
        for folder in made:  # deepest first; a parent that holds anything else stays
            folder.rmdir()
    except OSError:
        pass


def _make_folder(out: Path, resuming: bool) -> list[Path]:
    """Create the run folder (and its parents) and check that it takes files;
    returns the folders created, deepest first."""
    made, p = [], out
    while not (p.exists() or p.is_symlink()) and p != p.parent:
        made.append(p)
        p = p.parent
    if out.exists() and not out.is_dir():
        raise TransferkitError(f"--out {out} is a file, not a folder; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TransferkitError(f"cannot create the run folder {out} ({e.strerror or e}); "
                               "choose another --out in a folder you can write") from None
    try:
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        _discard(made)
        if resuming:
            raise TransferkitError(f"the run folder {out} is read-only ({e.strerror or e}); make "
                                   "it writable to resume it, or copy it elsewhere and resume the "
                                   "copy") from None
        raise TransferkitError(f"cannot write in the run folder {out} ({e.strerror or e}); "
                               "choose another --out in a folder you can write") from None
    return made


def _absolute(cfg: TrainConfig, resume: str | Path | None) -> TrainConfig:
    """The data folder, data_dir and out as absolute paths:
    the run is found again from any directory."""
    changes: dict[str, Any] = {"out": str(Path(cfg.out).expanduser().absolute())} if cfg.out else {}
    if cfg.data_dir:
        changes["data_dir"] = str(Path(cfg.data_dir).expanduser().absolute())
    if not sources.is_named(cfg.data):
        data = Path(cfg.data).expanduser()
        if data.exists():
            changes["data"] = str(data.absolute())
        elif resume is not None:
            raise TransferkitError(
                f"the run's data folder {cfg.data} (recorded in {Path(resume) / 'config.yaml'}) "
                "is missing; if it moved, pass its new place: "
                f"transferkit train --resume {resume} --data NEWPATH")
    return cfg.replace(**changes) if changes else cfg


def _lock(out: Path) -> IO[str]:
    """An OS lock on the run folder while this process writes it;
    a second run is refused by name."""
    try:
        f = open(out / runfiles.LOCK, "a+")  # held open for the whole run
    except OSError as e:
        raise TransferkitError(f"cannot write in the run folder {out} ({e.strerror or e}); "
                               "choose another --out in a folder you can write") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise TransferkitError(f"{out} is being written by another transferkit run "
                               f"(process {holder}); wait for it to finish, or choose "
                               "another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def writer_of(run_dir: str | Path) -> str | None:
    """The process that holds the run folder's lock (a run training in it now: its model may still
    change), or None. Takes nothing and writes nothing: a read-only folder is read alike."""
    try:
        f = open(Path(run_dir) / runfiles.LOCK)
    except OSError:  # no lock file: never trained here, or by a transferkit that wrote none
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "unknown"
        except OSError:
            return None
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _prepare(cfg: TrainConfig, resume: str | Path | None, overwrite: bool,
             dist: Dist) -> tuple[TrainConfig, Path, bool, IO[str], list[Path]]:
    """Create (or check) and lock the run folder; returns the config,
    the folder, whether to resume, the lock and the folders this run created."""
    if dist.on and not cfg.out and not dist.run_id and dist.max_restarts > 0:
        log.warning("no --out: a restarted worker will not find this run; "
                    "give --out (or --rdzv-id)")
    cfg = _absolute(cfg, resume)
    # Under torchrun the default name uses the job's run id, which a restarted worker sees again.
    stamp = (dist.run_id if dist.on else None) or time.strftime("%Y%m%d-%H%M%S")
    out = Path(cfg.out or f"runs/{Path(cfg.data).name or 'data'}-{cfg.model}-{stamp}").absolute()
    data = Path(cfg.data).expanduser()
    if data.is_dir() and data.resolve() in (out.resolve(), *out.resolve().parents):
        raise TransferkitError(f"--out {out} is inside --data {cfg.data}: the run's files would "
                               "become images of a class; choose an --out outside the data folder")
    resuming = resume is not None
    made = _make_folder(out, resuming)
    try:
        lock = _lock(out)
    except BaseException:
        _discard(made)
        raise
    try:
        if not resuming and dist.restart > 0 and (out / runfiles.LAST).exists():
            # torchrun restarted the workers after one died (--max-restarts): continue from last.pt.
            saved = TrainConfig.from_yaml(out / runfiles.CONFIG)
            # config.yaml holds resolved values
            asked = saved.replace(**requested_from(out / runfiles.CONFIG))
            keep = {k: getattr(cfg, k) for k in RESUMABLE_CHANGES}
            differs = [k for k in dataclasses.asdict(cfg)
                       if k not in keep and k != "out" and getattr(cfg, k) != getattr(asked, k)]
            if differs:
                raise TransferkitError(f"torchrun restart: {out} holds a run with other settings "
                                       f"({', '.join(differs)}); not resuming it")
            log.warning("torchrun restart %d: resuming from %s", dist.restart, out / runfiles.LAST)
            return saved.replace(out=str(out), **keep), out, True, lock, made
        if not resuming and (out / runfiles.LAST).exists() and not overwrite:
            raise TransferkitError(
                f"{out} already holds a run; pass --resume {out} to continue it, --overwrite to "
                "replace it, or another --out"
            )
    except BaseException:
        lock.close()
        _discard(made)
        raise
    return cfg.replace(out=str(out)), out, resuming, lock, made


def begin_writing(out: Path, cfg: TrainConfig, overwrite: bool, skipped: list[tuple[str, str]],
                  requested: dict[str, Any] | None = None) -> None:
    """The run has its settings, data and weights: only now does it replace an old run (--overwrite)
    and write its first files, config.yaml (resolved settings,
    and what was `requested` where it differs) and the list of unreadable files."""
    if overwrite:
        for old in runfiles.OUTPUTS:
            for f in out.glob(old):
                f.unlink()
        _remove_exports(out)
    atomic_write(out / runfiles.CONFIG, cfg.to_yaml(requested))
    if skipped:
        add_skipped(out, skipped)
        log.warning("%d unreadable files skipped; list in %s", len(skipped), out / runfiles.SKIPPED)


def add_skipped(out: Path, rows: list[tuple[str, str]]) -> None:
    """Add (path, why) rows to the run's skipped.txt, one `path<TAB>why` line each: the lines
    already there stay (a resumed run keeps what its earlier epochs could no longer read), and a
    path already listed is not listed again."""
    path = out / runfiles.SKIPPED
    old = path.read_text(errors="replace") if path.is_file() else ""
    listed = {line.split("\t")[0] for line in old.splitlines()}
    new = "".join(f"{f}\t{why}\n" for f, why in dict(rows).items() if f not in listed)
    if new:
        atomic_write(path, old + new)


def _remove_exports(out: Path) -> None:
    """--overwrite: the old run's exported files
    (named in its export.json) would answer for the old model."""
    record = out / runfiles.EXPORT
    try:
        names = list(json.loads(record.read_text())) if record.is_file() else []
    except (OSError, ValueError, TypeError):
        names = []
    for name in names:
        f = out / str(name)
        if f.parent == out and f.is_file():
            f.unlink()
            log.info("removed %s, exported from the run this one replaces", f)
    record.unlink(missing_ok=True)


def resume_command(out: Path, dist: Dist) -> str:
    """The command that continues this run (under torchrun with the same number of processes)."""
    launch = f"torchrun --nproc_per_node={dist.world} -m transferkit" if dist.on else "transferkit"
    return f"{launch} train --resume {out}"
