"""The one exception type that reaches the user as a message instead of a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TransferkitError(Exception):
    """A problem the user can fix; the CLI prints the message and exits with status 2."""


class CheckFailed(TransferkitError):
    """A check of the work failed (e.g. an export disagrees with PyTorch)
    and nothing was kept: exit status 1."""

    exit_code = 1


class Interrupted(TransferkitError):
    """Ctrl-C or SIGTERM: the run stopped after a step
    and saved a checkpoint (the CLI exits 130)."""

    def __init__(self, message: str, main: bool = True) -> None:
        super().__init__(message)
        self.main = main  # this process speaks for the job (rank 0 under torchrun)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return " — did you mean 'x'?" for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" — did you mean '{close[0]}'?" if close else ""
