"""The run folder: which settings a run has, whether it starts or resumes, what it may replace."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .checkpoint import LAST_FILE, META_FILE, MODEL_FILE, load_last
from .config import TrainConfig
from .errors import TransferkitError
from .files import atomic_write
from .runtime import Dist

log = logging.getLogger(__name__)

RESUMABLE_CHANGES = {"epochs", "device", "workers", "log_every", "compile", "checkpoint_every", "micro_batch", "tta"}
LOCK_FILE = ".lock"
# What --overwrite replaces (train.log is kept: the new run's log follows the old one's).
RUN_OUTPUTS = (LAST_FILE, MODEL_FILE, META_FILE, "metrics.jsonl", "skipped.txt", "report*", "eval-*", "curves.png")


def settings_of(config: TrainConfig | None, resume: str | Path | None, settings: dict[str, Any]) -> TrainConfig:
    """The run's settings: a resumed run's own config.yaml (only RESUMABLE_CHANGES may change), or new ones."""
    if resume is not None:
        changed = sorted(set(settings) - RESUMABLE_CHANGES)
        if changed or config is not None:
            raise TransferkitError(
                f"--resume continues a run with its own config.yaml; only {', '.join(sorted(RESUMABLE_CHANGES))} "
                f"may change (not {', '.join(changed) or 'a new config'})"
            )
        if not (Path(resume) / "config.yaml").is_file():
            raise TransferkitError(f"nothing to resume in '{resume}': no config.yaml (is it a run folder?)")
        return TrainConfig.from_yaml(Path(resume) / "config.yaml", **settings, out=str(resume))
    if config is None:
        return TrainConfig.create(**settings)
    return config.replace(**settings) if settings else config


@dataclass
class RunStart:
    """Rank 0's decision, shared with every process: the settings, the folder, the state to resume."""

    cfg: TrainConfig | None = None
    out: str = ""
    saved: dict[str, Any] | None = None  # last.pt's contents when resuming
    error: str | None = None
    replace: bool = False  # --overwrite: an old run's files go when this run writes its first file


@contextlib.contextmanager
def run_folder(cfg: TrainConfig, resume: str | Path | None, overwrite: bool, dist: Dist) -> Iterator[RunStart]:
    """Rank 0 prepares the run folder, locks it for the time of the block and reads last.pt; every
    process gets the same RunStart."""
    start, lock = RunStart(error="rank 0 did not prepare the run"), None
    try:
        if dist.main:
            try:
                cfg, out, resuming, lock = _prepare(cfg, resume, overwrite, dist)
                start = RunStart(cfg, str(out), load_last(out) if resuming else None,
                                 replace=overwrite and not resuming)
            except TransferkitError as e:
                start = RunStart(error=str(e))
        start = dist.share(start)
        if start.error is not None:
            raise TransferkitError(start.error)
        yield start
    finally:
        if lock is not None:
            lock.close()  # the OS releases the lock with the file (and with a killed process)


def _lock(out: Path) -> IO[str]:
    """An OS lock on the run folder while this process writes it; a second run is refused by name."""
    f = open(out / LOCK_FILE, "a+")  # held open for the whole run
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise TransferkitError(f"{out} is being written by another transferkit run (process {holder}); wait for "
                               "it to finish, or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _prepare(cfg: TrainConfig, resume: str | Path | None, overwrite: bool,
             dist: Dist) -> tuple[TrainConfig, Path, bool, IO[str]]:
    """Create (or check) and lock the run folder; returns the config, the folder, whether to resume, the lock."""
    if dist.on and not cfg.out and not dist.run_id and dist.max_restarts > 0:
        log.warning("no --out: a restarted worker will not find this run; give --out (or --rdzv-id)")
    # Under torchrun the default name uses the job's run id, which a restarted worker sees again.
    stamp = (dist.run_id if dist.on else None) or time.strftime("%Y%m%d-%H%M%S")
    out = Path(cfg.out or f"runs/{Path(cfg.data).name or 'data'}-{cfg.model}-{stamp}")
    data = Path(cfg.data).expanduser()
    if data.is_dir() and data.resolve() in (out.resolve(), *out.resolve().parents):
        raise TransferkitError(f"--out {out} is inside --data {cfg.data}: the run's files would become images of "
                               "a class; choose an --out outside the data folder")
    resuming = resume is not None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TransferkitError(f"cannot create the run folder {out}: {e.strerror or e}; choose another --out") from None
    lock = _lock(out)
    if not resuming and dist.restart > 0 and (out / LAST_FILE).exists():
        # torchrun restarted the workers after one died (--max-restarts): continue from last.pt.
        saved = TrainConfig.from_yaml(out / "config.yaml")
        keep = {k: getattr(cfg, k) for k in RESUMABLE_CHANGES}
        differs = [k for k in dataclasses.asdict(cfg)
                   if k not in keep and k != "out" and getattr(cfg, k) != getattr(saved, k)]
        if differs:
            raise TransferkitError(f"torchrun restart: {out} holds a run with other settings "
                                   f"({', '.join(differs)}); not resuming it")
        log.warning("torchrun restart %d: resuming from %s", dist.restart, out / LAST_FILE)
        return saved.replace(out=str(out), **keep), out, True, lock
    if not resuming and (out / LAST_FILE).exists() and not overwrite:
        lock.close()
        raise TransferkitError(
            f"{out} already holds a run; pass --resume {out} to continue it, --overwrite to "
            "replace it, or another --out"
        )
    return cfg.replace(out=str(out)), out, resuming, lock


def begin_writing(out: Path, cfg: TrainConfig, replace: bool, skipped: list[tuple[str, str]]) -> None:
    """The run has its settings, data and weights: only now does it replace an old run (--overwrite)
    and write its first files, config.yaml and the list of unreadable files."""
    if replace:
        for old in RUN_OUTPUTS:
            for f in out.glob(old):
                f.unlink()
    atomic_write(out / "config.yaml", cfg.to_yaml())
    if skipped:
        atomic_write(out / "skipped.txt", "".join(f"{p}\t{r}\n" for p, r in skipped))
        log.warning("%d unreadable files skipped; list in %s", len(skipped), out / "skipped.txt")


def resume_command(out: Path, dist: Dist) -> str:
    """The command that continues this run (under torchrun with the same number of processes)."""
    launch = f"torchrun --nproc_per_node={dist.world} -m transferkit" if dist.on else "transferkit"
    return f"{launch} train --resume {out}"
