"""When a scheduled measurement runs: a schedule is a callable ``step -> bool`` (steps count from 1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .validate import positive_int

Schedule = Callable[[int], bool]


class every:
    """True on steps ``n, 2n, 3n, ...``."""

    def __init__(self, n: int) -> None:
        self.n = positive_int("n", n, unit="steps", owner="every(n)")

    def __call__(self, step: int) -> bool:
        return step % self.n == 0

    def __repr__(self) -> str:
        return f"every({self.n})"


def as_schedule(name: str, spec: Any) -> Schedule | None:
    """``0`` or ``None`` -> off (None); a positive int ``n`` -> ``every(n)``; a callable ``step -> bool`` as is."""
    if spec is None or (isinstance(spec, int) and not isinstance(spec, bool) and spec == 0):
        return None
    if isinstance(spec, int) and not isinstance(spec, bool) and spec > 0:
        return every(spec)
    if callable(spec):
        return spec
    raise ValueError(
        f"{name} must be 0 (off), a positive number of steps, or a callable step -> bool; got {spec!r}."
    )


def describe(schedule: Schedule | None) -> str | None:
    """A JSON-safe description for run.json."""
    if schedule is None:
        return None
    return repr(schedule) if isinstance(schedule, every) else getattr(schedule, "__name__", repr(schedule))
