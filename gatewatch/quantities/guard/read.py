"""Online guard, read half: the report's ``guard`` list (the guard's events from run.json; pandas only)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...declarations import ReadHalf, Section
from ...rules import Thresholds

if TYPE_CHECKING:
    from ...loaded_run import Run



def guard_events(run: Run, thresholds: Thresholds) -> list[dict[str, Any]]:
    """What the guard did: ``[{"step", "rule", "gate", "action": "dropout"|"revert", "rate", "why",
    "before": {"step", "top_share", "effective_experts"}, "after": {...} | None}]`` (empty without a guard)."""
    guard = run.meta.get("guard")
    return list(guard.get("events") or []) if isinstance(guard, dict) else []


# its events go to the shared ``events`` table (kind "guard"); it has no table of its own
QUANTITY = ReadHalf(sections=(Section("guard", guard_events),))
