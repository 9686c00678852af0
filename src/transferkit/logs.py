"""The package logger during one run: a train.log beside the run, and left as it was found afterwards."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

LOGGER = "transferkit"


@contextlib.contextmanager
def run_logging(quiet: bool) -> Iterator[Callable[[Path], None]]:
    """Within the block the package logs at INFO (errors only when `quiet`: torchrun's other ranks);
    the callable it gives adds a log file. Level and handlers are restored on exit."""
    logger = logging.getLogger(LOGGER)
    level, handlers = logger.level, list(logger.handlers)
    if quiet:
        logger.setLevel(logging.ERROR)
    elif level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)

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
