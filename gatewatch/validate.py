"""Checks of user-given settings, one place for each (no torch): each returns the value, normalised, or raises
ValueError whose message names the setting, what it got and what to pass instead.

``owner`` (optional) prefixes the message with what is being configured, e.g. ``"GateDropout: p must ..."``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def _prefix(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def _int_at_least(name: str, value: Any, minimum: int, what: str, unit: str | None, owner: str | None) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum:
        return int(value)
    if isinstance(value, bool):
        fix = f"pass a number, not {value}"
    elif isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer() and value >= minimum:
        fix = f"pass it as an int: {int(value)}"
    else:
        fix = f"pass a whole number >= {minimum}"
    unit_text = f" ({unit})" if unit else ""
    raise ValueError(f"{_prefix(owner)}{name} must be a {what}{unit_text}, got {value!r}: {fix}.")


def positive_int(name: str, value: Any, *, unit: str | None = None, owner: str | None = None) -> int:
    """``value`` as an int if it is a whole number >= 1 (an ``int`` or NumPy integer, not a bool)."""
    return _int_at_least(name, value, 1, "positive integer", unit, owner)


def non_negative_int(name: str, value: Any, *, unit: str | None = None, owner: str | None = None) -> int:
    """``value`` as an int if it is a whole number >= 0 (an ``int`` or NumPy integer, not a bool)."""
    return _int_at_least(name, value, 0, "non-negative integer", unit, owner)


def is_dropout_rate(value: Any) -> bool:
    """Whether ``value`` is a dropout rate: a real number (not a bool) with 0 <= value < 1 (NaN is not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0.0 <= value < 1.0


def dropout_rate(name: str, value: Any, *, owner: str | None = None) -> float:
    """``value`` as a float if it is a dropout rate (see :func:`is_dropout_rate`)."""
    if not is_dropout_rate(value):
        raise ValueError(f"{_prefix(owner)}{name} must be a number with 0 <= {name} < 1, got {value!r}: pass e.g. "
                         "0.1 to drop 10% of the experts of each sample.")
    return float(value)
