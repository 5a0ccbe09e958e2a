"""Argument checks shared by the package: each raises an error that says what to change.

A wrong type raises ``TypeError``, a value out of range ``ValueError``; both name the argument
(``owner.name``) and show what was given, so a typo fails where it is made instead of as an
operator error deep inside a forward pass.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_positive_int", "check_int", "check_real", "check_bool"]


def _label(owner: str, name: str) -> str:
    """``owner.name``, or ``owner[key]`` for a name written as ``[key]`` (a dict entry)."""
    if not owner:
        return name
    return f"{owner}{name}" if name.startswith("[") else f"{owner}.{name}"


def _spelled(name: str, value: Any) -> str:
    return f"{value!r}" if name.startswith("[") else f"{name}={value!r}"


def check_int(owner: str, name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` must be an int (not a bool, not a string) and at least ``minimum``."""
    label = _label(owner, name)
    if isinstance(value, bool) or not isinstance(value, int):
        hint = f"; write {_spelled(name, int(value))}" if _is_integral_text_or_float(value) else ""
        raise TypeError(f"{label} must be an int, got {type(value).__name__} ({value!r}){hint}")
    if minimum is not None and value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{label} must be {what}, got {value}")
    return value


def check_positive_int(owner: str, name: str, value: Any) -> int:
    """``value`` must be an int >= 1."""
    return check_int(owner, name, value, minimum=1)


def check_real(owner: str, name: str, value: Any, *, above: float | None = None,
               at_least: float | None = None, finite: bool = True, hint: str = "") -> float:
    """``value`` must be a real number (int or float, not a bool or a string), finite unless
    ``finite=False``, and ``> above`` / ``>= at_least`` when given. ``hint`` ends the message."""
    label = _label(owner, name)
    hint = f" ({hint})" if hint else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        extra = ""
        if isinstance(value, str):
            try:
                extra = f"; write {_spelled(name, float(value))}, a number, not a string"
            except ValueError:
                pass
        raise TypeError(f"{label} must be a number, got {type(value).__name__} ({value!r}){extra}")
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{label} must be a finite number, got {value}{hint}")
    if above is not None and not value > above:
        raise ValueError(f"{label} must be > {above}, got {value}{hint}")
    if at_least is not None and not value >= at_least:
        raise ValueError(f"{label} must be >= {at_least}, got {value}{hint}")
    return value


def check_bool(owner: str, name: str, value: Any, allow_none: bool = False) -> bool | None:
    """``value`` must be True or False (or None when ``allow_none``): a string such as
    ``"false"`` is truthy in Python, so it is refused rather than read as True."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        choices = "True, False or None" if allow_none else "True or False"
        raise TypeError(f"{_label(owner, name)} must be {choices}, got {type(value).__name__} ({value!r})")
    return value


def _is_integral_text_or_float(value: Any) -> bool:
    try:
        return (isinstance(value, float) and value.is_integer()) or \
            (isinstance(value, str) and str(int(value)) == value.strip())
    except (ValueError, OverflowError):
        return False
