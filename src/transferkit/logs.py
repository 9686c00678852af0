"""The package logger during one run:
a train.log beside the run, and left as it was found afterwards."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

LOGGER = "transferkit"
log = logging.getLogger(__name__)


@contextlib.contextmanager
def run_logging(quiet: bool) -> Iterator[Callable[[Path], None]]:
    """Within the block the package logs at INFO (errors only when `quiet`: torchrun's other ranks),
    on stderr too when nothing else would show it; the callable it gives adds a log file. Level and
    handlers are restored on exit."""
    logger = logging.getLogger(LOGGER)
    level, handlers = logger.level, list(logger.handlers)
    if quiet:
        logger.setLevel(logging.ERROR)
    elif level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    if not quiet and not logger.handlers and not logging.getLogger().handlers:
        # A library call where nobody configured logging:
        # show the run's progress on stderr, as the CLI does.
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)

    def to_file(path: Path) -> None:
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.setLevel(logging.INFO)
        logger.addHandler(handler)

    try:
        yield to_file
    finally:
        for h in logger.handlers:
            if h not in handlers:
                h.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)


# Without a terminal (a log file, nohup, CI, a notebook's captured output) tqdm draws no bar: a
# progress line this often instead, so that slow can be told from stuck.
PLAIN_PROGRESS_SECONDS = 30.0


class EpochProgress:
    """One progress bar per epoch (on rank 0) with the loss and speed, and the running loss in the
    log every `log_every` steps (as the classic tutorial prints it every 100 batches); where stderr
    is not a terminal, a line every PLAIN_PROGRESS_SECONDS instead of the bar."""

    def __init__(self, desc: str, total: int, start: int, *, show: bool, log_every: int,
                 world: int) -> None:
        self.bar = tqdm(total=total, initial=start, desc=desc, unit="batch", leave=False,
                        disable=True if not show else None)
        self.plain = show and self.bar.disable  # tqdm turns itself off where it cannot draw
        self.desc, self.log_every, self.world = desc, log_every, world
        self.total, self.start = total, start
        self.images, self.started = 0, time.perf_counter()
        self.said = self.started

    def step(self, step: int, loss: torch.Tensor, images: int, running: Any) -> bool:
        """Count a step; every 20 steps (and every `log_every`) show the figures and return True."""
        self.bar.update()
        self.images += images
        if self.plain and time.perf_counter() - self.said >= PLAIN_PROGRESS_SECONDS:
            self._line(step, running)
        logged = bool(self.log_every) and step % self.log_every == 0
        if step % 20 and not logged:
            return False
        rate = self.world * self.images / (time.perf_counter() - self.started)
        self.bar.set_postfix(loss=f"{loss.item() / max(images, 1):.3f}", img_s=f"{rate:.0f}")
        if logged:
            log.info("[%s, batch %5d] loss: %.3f", self.desc, step,
                     running.loss.item() / max(running.images, 1))
        return True

    def _line(self, step: int, running: Any) -> None:
        """'epoch 1/3: step 120/446, loss 0.912, 310 img/s, 2 min 5 s left in the epoch'."""
        self.said = time.perf_counter()
        spent = self.said - self.started
        left = (self.total - step) * spent / max(step - self.start, 1)
        log.info("%s: step %d/%d, loss %.3f, %.0f img/s, %s left in the epoch", self.desc, step,
                 self.total, running.loss.item() / max(running.images, 1),
                 self.world * self.images / max(spent, 1e-9), duration(left))

    def close(self) -> None:
        self.bar.close()


def duration(seconds: float) -> str:
    """'45 s', '2 min 5 s', '1 h 12 min'."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"
