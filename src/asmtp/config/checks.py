"""The checks every setting shares: :func:`check_number` (the one check of every
number asmtp takes: finite, of the right kind and sign), text without CR, LF or NUL,
flags, file paths, and whether an optional package is installed.
"""

from __future__ import annotations

import importlib.util
import math
import os

from ..errors import InputError


def _check_text(what: str, value: str) -> None:
    if any(ch in value for ch in "\r\n\0"):
        raise InputError(f"{what} must not contain CR, LF or NUL: {value!r}")


def _check_flag(what: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InputError(f"{what} must be True or False: {value!r}")


def _file_path(what: str, value: object) -> str:
    """``value`` (a str or a path-like object) as a str, checked: not empty, no NUL."""
    try:
        path = os.fspath(value)  # type: ignore[call-overload]
    except TypeError:
        raise InputError(f"{what} must be a path (str or pathlib.Path): {value!r}") from None
    if not isinstance(path, str) or not path:
        raise InputError(f"{what} must be a non-empty path: {value!r}")
    _check_text(what, path)
    return path


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float: 10**400 seconds
        return False


def check_number(
    what: str,
    value: object,
    *,
    minimum: float = 0.0,
    above: bool = True,
    integer: bool = False,
    optional: bool = False,
) -> None:
    """The one check for every number asmtp takes: a finite int or float (never a bool,
    NaN or an infinity) above ``minimum`` (or at least it, ``above=False``); a whole
    number when ``integer``; ``None`` passes when ``optional`` (it means "no limit").

    NaN compares false with everything, so a plain ``value <= 0`` test lets it through
    and a NaN timeout silently disables the timeout.

    >>> check_number("timeout", 2.5)
    >>> check_number("timeout", float("nan"))
    Traceback (most recent call last):
    ...
    asmtp.errors.InputError: timeout must be a positive finite number: nan
    """
    if value is None and optional:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (integer and not isinstance(value, int))
        or (not integer and not _finite(value))
        or (value <= minimum if above else value < minimum)
    ):
        kind = "whole number" if integer else "finite number"
        if minimum == 0 and above:
            bound = f"a positive {kind}"
        elif minimum == 0:
            bound = f"a {kind} >= 0"
        else:
            bound = f"a {kind} {'>' if above else '>='} {minimum:g}"
        none = " or None" if optional else ""
        raise InputError(f"{what} must be {bound}{none}: {value!r}")


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
