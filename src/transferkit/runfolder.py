"""The run folder: which settings a run has, whether it starts or resumes, what it may replace."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import LAST_FILE, META_FILE, MODEL_FILE, load_last
from .config import TrainConfig
from .errors import TransferkitError
from .runtime import Dist

log = logging.getLogger(__name__)

RESUMABLE_CHANGES = {"epochs", "device", "workers", "log_every", "compile", "checkpoint_every", "micro_batch", "tta"}
RUN_OUTPUTS = (LAST_FILE, MODEL_FILE, META_FILE, "metrics.jsonl", "skipped.txt", "report*", "eval-*", "curves.png",
               "train.log")


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


def start_run(cfg: TrainConfig, resume: str | Path | None, overwrite: bool, dist: Dist) -> RunStart:
    """Rank 0 prepares the run folder and reads last.pt; every process gets the same RunStart."""
    start = RunStart(error="rank 0 did not prepare the run")
    if dist.main:
        try:
            cfg, out, resuming = _prepare(cfg, resume, overwrite, dist)
            start = RunStart(cfg, str(out), load_last(out) if resuming else None)
        except TransferkitError as e:
            start = RunStart(error=str(e))
    start = dist.share(start)
    if start.error is not None:
        raise TransferkitError(start.error)
    return start


def _prepare(cfg: TrainConfig, resume: str | Path | None, overwrite: bool,
             dist: Dist) -> tuple[TrainConfig, Path, bool]:
    """Create (or check) the run folder; returns the config, the folder and whether to resume."""
    if dist.on and not cfg.out and not dist.run_id and dist.max_restarts > 0:
        log.warning("no --out: a restarted worker will not find this run; give --out (or --rdzv-id)")
    # Under torchrun the default name uses the job's run id, which a restarted worker sees again.
    stamp = (dist.run_id if dist.on else None) or time.strftime("%Y%m%d-%H%M%S")
    out = Path(cfg.out or f"runs/{Path(cfg.data).name or 'data'}-{cfg.model}-{stamp}")
    resuming = resume is not None
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
        return saved.replace(out=str(out), **keep), out, True
    if not resuming and (out / LAST_FILE).exists() and not overwrite:
        raise TransferkitError(
            f"{out} already holds a run; pass --resume {out} to continue it, --overwrite to "
            "replace it, or another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and not resuming:
        for old in RUN_OUTPUTS:
            for f in out.glob(old):
                f.unlink()
    return cfg.replace(out=str(out)), out, resuming


def resume_command(out: Path, dist: Dist) -> str:
    """The command that continues this run (under torchrun with the same number of processes)."""
    launch = f"torchrun --nproc_per_node={dist.world} -m transferkit" if dist.on else "transferkit"
    return f"{launch} train --resume {out}"
