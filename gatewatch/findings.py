"""Findings in plain words, each with its remedy: ``find(run, Thresholds()) -> list[Finding]``.

The rules live with their quantities (``gatewatch.quantities.<name>.read``); this module runs them all
over a :class:`~gatewatch.loaded_run.Run` (pandas only) and orders the result, most severe first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .registry import Gathered, read_halves
from .rules import SEVERITY_ORDER, Finding, Thresholds, gate_unit, streak_start

if TYPE_CHECKING:
    from .loaded_run import Run

REMEDIES: Mapping[str, str] = Gathered("REMEDIES")  # remedy texts by code, of every registered quantity


def rules() -> list[Callable[[Run, Thresholds], list[Finding]]]:
    """The finding rules of every registered quantity."""
    return [rule for half in read_halves() for rule in half.RULES]


def find(run: Run, thresholds: Thresholds | None = None) -> list[Finding]:
    """All findings of a run, most severe first (then by step)."""
    th = thresholds or Thresholds()
    found = [f for rule in rules() for f in rule(run, th)]
    return sorted(found, key=lambda f: (SEVERITY_ORDER[f.severity], f.step))


__all__ = ["REMEDIES", "SEVERITY_ORDER", "Finding", "Thresholds", "find", "gate_unit", "rules", "streak_start"]
