"""Findings in plain words, each with its remedy: ``find(run, Thresholds()) -> list[Finding]``.

The rules live with their quantities (``gatewatch.quantities.<name>.read``); this module runs them all
over a :class:`~gatewatch.loaded_run.Run` (pandas only) and orders the result, most severe first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .registry import Gathered, declarations
from .rules import SEVERITY_ORDER, Finding, Thresholds, gate_unit, streak_start

if TYPE_CHECKING:
    from .loaded_run import Run

# the remedy texts by finding code, of every registered quantity (the nn.Modules of remedies: gatewatch.remedies)
REMEDY_TEXTS: Mapping[str, str] = Gathered("remedy_texts")


def rules() -> list[Callable[[Run, Thresholds], list[Finding]]]:
    """The finding rules of every registered quantity."""
    return [rule for _, half in declarations() for rule in half.rules]


def find(run: Run, thresholds: Thresholds | None = None) -> list[Finding]:
    """All findings of a run, most severe first (then by step)."""
    th = thresholds or Thresholds()
    found = [f for rule in rules() for f in rule(run, th)]
    return sorted(found, key=lambda f: (SEVERITY_ORDER[f.severity], f.step))


__all__ = ["REMEDY_TEXTS", "SEVERITY_ORDER", "Finding", "Thresholds", "find", "gate_unit", "rules", "streak_start"]
