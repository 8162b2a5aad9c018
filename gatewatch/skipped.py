"""The views a run could not compute, and why: the report's ``skipped`` list.

Each quantity's read half declares ``skipped(run)`` (:class:`~gatewatch.declarations.ReadHalf`), read from the
fields its capture half wrote to run.json; an entry is ``{"view", "gate", "reason", "fix"}`` (``gate`` None when
the whole view is off; ``fix`` says what to pass). A view is never silently empty: when it has no rows for a gate,
the report says why here. Runs recorded before run.json kept the expert map (no ``expert_modules`` key) are not
judged on it.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

from .layer_names import name_pattern

MAP_FIX = ("pass gw.Gate(..., expert_modules=[one module per gate column]) or, for experts held as slices of "
           "[E, ...] parameters, gw.Gate(..., expert_modules=gw.FusedExperts(module, dim=...))")
EXPERT_PARALLEL = ("its experts are split over the mesh's 'ep' ranks and {why}; per-expert figures are gathered from "
                   "the experts' owners only for fused experts, 'ep' rank r holding experts r*E/ep to (r+1)*E/ep-1 "
                   "as the slices of [E/ep, ...] parameters; the gate, router and loss figures stay exact")
EXPERT_PARALLEL_FIX = ("hold each rank's experts as one module of [E/ep, ...] parameters (found by itself, or "
                       "gw.Gate(..., expert_modules=gw.FusedExperts(module, dim=...))), or measure per-expert figures "
                       "in a run without 'ep'")
PIPELINE = ("it is held by pipeline stage {stage}, and per-expert figures are not gathered from another stage yet "
            "(they come from the writer's own stage); the gate, router and loss figures stay exact")
PIPELINE_FIX = "measure per-expert figures of this layer in a run where rank 0's stage holds it, or without 'pp'"
SEE_REASON = "see the reason"
NONE_YET = "none yet"


def entry(view: str, gate: str | None, reason: str, fix: str = SEE_REASON) -> dict[str, Any]:
    """One entry of the ``skipped`` list."""
    return {"view": view, "gate": gate, "reason": reason, "fix": fix}


def described_gates(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The gates run.json describes."""
    return [g for g in meta.get("gates") or [] if isinstance(g, dict) and "name" in g]


def unmapped(gate: dict[str, Any]) -> bool:
    """Whether the run looked for this gate's experts (module or fused) and found none."""
    return "expert_modules" in gate and not gate.get("expert_modules") and not gate.get("fused_experts")


def map_fix(gate: dict[str, Any]) -> str:
    """What to pass for a gate whose experts were not found."""
    how = str(gate.get("expert_map"))
    if how.startswith(EXPERT_PARALLEL.split("{")[0]):
        return EXPERT_PARALLEL_FIX
    return PIPELINE_FIX if how.startswith(PIPELINE.split("{")[0]) else MAP_FIX


def why_unmapped(gate: dict[str, Any]) -> str:
    """Why a gate's experts were not found, as run.json recorded it."""
    return str(gate.get("expert_map") or "the gate produced no output in training mode, so its experts were never "
                                         "looked for")


def skipped_lines(skipped: list[dict[str, Any]]) -> list[str]:
    """The text report's lines for the ``skipped`` list (none when nothing was skipped). A view skipped on three
    gates or more for one reason (reasons that differ only in their numbers, such as a layer index, count as one)
    is one line with the gates as a pattern; lines are wrapped at 160 columns."""
    if not skipped:
        return []
    lines = ["", f"skipped ({len(skipped)}):"]
    alike: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for s in skipped:
        alike.setdefault((s["view"], _NUMBERS.sub("#", s["reason"]), s["fix"]), []).append(s)
    for (view, _, fix), group in alike.items():
        named = [s["gate"] for s in group if s["gate"] is not None]
        if len(named) >= 3 and len(named) == len(group):
            said = [(f" of {len(named)} gates, {name_pattern(named)}",
                     ("e.g. " if len({s['reason'] for s in group}) > 1 else "") + group[0]["reason"])]
        else:
            said = [(f" of gate {s['gate']!r}" if s["gate"] is not None else "", s["reason"]) for s in group]
        for who, reason in said:
            lines += _wrap(f"{view}{who}: {reason}", "  ", "      ")
            if fix not in (SEE_REASON, NONE_YET) and fix not in reason:
                lines += _wrap(f"fix: {fix}", "      ", "        ")
    return lines


_NUMBERS = re.compile(r"\d+")


def _wrap(text: str, first: str, rest: str) -> list[str]:
    return textwrap.wrap(text, 160, initial_indent=first, subsequent_indent=rest, break_long_words=False,
                         break_on_hyphens=False)
