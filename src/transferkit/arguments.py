"""The public functions' arguments checked against their type hints, one rule for all of them: a
value of the wrong type is refused with a sentence naming the argument and what it takes, instead
of a TypeError or AttributeError from deep inside."""

from __future__ import annotations

import functools
import inspect
import numbers
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from .errors import TransferkitError, shown

F = TypeVar("F", bound=Callable[..., Any])


class ArgumentError(TransferkitError, TypeError):
    """An argument of the wrong type: a TransferkitError, and a TypeError as Python's own are."""


def checked(func: F) -> F:
    """`func` with each argument it is given checked against its type hint before it runs; the
    items of a list or tuple too, where the hint names them (`Sequence[str]`)."""
    signature = inspect.signature(func)
    spread = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)

    @functools.cache
    def hints() -> dict[str, Any]:  # on first use: a hint may name a class defined further down
        return typing.get_type_hints(func)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for name, value in signature.bind(*args, **kwargs).arguments.items():
            if name in hints() and signature.parameters[name].kind not in spread:
                _check(func.__qualname__, name, value, hints()[name])
        return func(*args, **kwargs)

    return typing.cast(F, wrapper)


def _check(where: str, name: str, value: Any, hint: Any) -> None:
    if not fits(value, hint):
        raise ArgumentError(f"{where}(): {name} takes {_say(hint)}, not {_show(value)}")
    if isinstance(value, list | tuple):
        items = _item_hints(value, hint)
        for i, item in enumerate(value if items else ()):
            if not any(fits(item, h) for h in items):
                raise ArgumentError(f"{where}(): {name}[{i}] takes "
                                    f"{' or '.join(_say(h) for h in items)}, not {_show(item)}")


def _item_hints(value: list | tuple, hint: Any) -> list[Any]:
    """What the items of `value` take, where `hint` names it (Sequence[str]: str)."""
    found = []
    for h in _alternatives(hint):
        origin, args = typing.get_origin(h), typing.get_args(h)
        if isinstance(origin, type) and isinstance(value, origin) and len(args) == 1:
            found.append(args[0])
    return found


def fits(value: Any, hint: Any) -> bool:
    """Whether `value` is of the type `hint` says (a generic's items are not looked at)."""
    if hint is Any:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(fits(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return value in typing.get_args(hint)
    if hint is None or hint is type(None):
        return value is None
    if hint in (int, float):  # numpy's numbers too; True and False are not numbers here
        wanted = numbers.Integral if hint is int else numbers.Real
        return isinstance(value, wanted) and not isinstance(value, bool)
    if hint is Path:
        return isinstance(value, os.PathLike)
    origin = typing.get_origin(hint) or hint
    if isinstance(value, bytes | bytearray) and origin not in (bytes, bytearray):
        # bytes iterate as ints: b"a/path" is no sequence of paths
        return all(fits(item, typing.get_args(hint)[0]) for item in value[:1]) if typing.get_args(
            hint) else False
    return not isinstance(origin, type) or isinstance(value, origin)


def _alternatives(hint: Any) -> tuple[Any, ...]:
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return typing.get_args(hint) if is_union else (hint,)


def _say(hint: Any) -> str:
    """The type in words: 'an int', 'a str or a Path', 'one of 'cpu', 'cuda''."""
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    words = []
    for h in _alternatives(hint):
        if h is None or h is type(None):
            words.append("None")
        else:
            name = getattr(typing.get_origin(h) or h, "__name__", str(h))
            name = {"Iterable": "iterable", "Sequence": "sequence", "float": "number",
                    "ndarray": "array", "Image": "PIL image"}.get(name, name)
            words.append(("an " if name[0].lower() in "aeiou" else "a ") + name)
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]


def _show(value: Any) -> str:
    """The value given, its length bounded, and its type."""
    return "None" if value is None else f"{shown(value)} ({type(value).__name__})"
