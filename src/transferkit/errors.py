"""The one exception type that reaches the user as a message instead of a traceback."""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable

# A value quoted in a message is shown at most about this long (a 1 KB YAML file once made a 2 GB
# message), and a whole message keeps its first and last MESSAGE_LIMIT / 2 characters.
VALUE_LIMIT = 80
MESSAGE_LIMIT = 4000

_short = reprlib.Repr()  # bounded at every level: never builds the whole text of a huge value
_short.maxstring = _short.maxother = _short.maxlong = VALUE_LIMIT
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 4
_short.maxlevel = 2


def shown(value: object) -> str:
    """`value` as a message quotes it: repr, cut to about VALUE_LIMIT characters with '...'."""
    text = _short.repr(value)
    return text if len(text) <= 2 * VALUE_LIMIT else text[:VALUE_LIMIT] + "..." + text[-10:]


class TransferkitError(Exception):
    """A problem the user can fix; the CLI prints the message and exits with status 2."""

    def __init__(self, message: str = "", *args: object) -> None:
        # a value quoted whole by a message that forgot shown()
        if isinstance(message, str) and len(message) > MESSAGE_LIMIT:
            cut = len(message) - MESSAGE_LIMIT
            half = MESSAGE_LIMIT // 2
            message = f"{message[:half]} [... {cut:,} characters ...] {message[-half:]}"
        super().__init__(message, *args)


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
    if len(word) > VALUE_LIMIT:
        return ""  # nothing that long is a typo of a name
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" — did you mean '{close[0]}'?" if close else ""
