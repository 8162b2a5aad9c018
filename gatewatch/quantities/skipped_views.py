"""The views a run could not compute, and why (pandas-free, from run.json): the report's ``skipped`` list.

Each entry: ``view`` (``"conflict"``, ``"expert_conflict"``, ``"similarity"``), ``gate`` (None when the whole
view is off), ``reason`` and ``fix`` (what to pass). Read from the fields the capture side writes:

* ``conflict.disabled``: conflict logging turned itself off (one task, no shared parameter ...);
* a gate's ``expert_map`` when neither ``expert_modules`` nor ``fused_experts`` holds its experts, while the
  run measured conflict (or its proxy): that gate has no ``expert_conflict`` entry;
* ``similarity.skipped`` (a pool whose experts could not be compared), and, while similarity was on, each gate
  in no pool of ``similarity.pools``.

Runs recorded before run.json kept the expert map (no ``expert_modules`` key) are not judged on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..loaded_run import Run

MAP_FIX = ("pass gw.Gate(..., expert_modules=[one module per gate column]) or, for experts held as slices of "
           "[E, ...] parameters, gw.Gate(..., expert_modules=gw.FusedExperts(module, dim=...))")


def skipped_views(run: Run) -> list[dict[str, Any]]:
    """The report's ``skipped`` list (see the module docstring)."""
    meta = run.meta
    gates = [g for g in meta.get("gates") or [] if isinstance(g, dict) and "name" in g]
    out: list[dict[str, Any]] = []
    conflict = meta.get("conflict") if isinstance(meta.get("conflict"), dict) else None
    if conflict is not None and conflict.get("disabled"):
        out.append(_entry("conflict", None, str(conflict["disabled"]), "see the reason"))
    if (conflict is not None and not conflict.get("disabled")) or isinstance(meta.get("conflict_proxy"), dict):
        out += [_entry("expert_conflict", g["name"], _why_unmapped(g), MAP_FIX) for g in gates if _unmapped(g)]
    similarity = meta.get("similarity") if isinstance(meta.get("similarity"), dict) else None
    if similarity is not None:
        for pool, why in (similarity.get("skipped") or {}).items():
            out.append(_entry("similarity", None, f"pool {pool!r}: {why}", "see the reason"))
        pooled = {name for pool in (similarity.get("pools") or {}).values() for name in pool.get("gates", [])}
        for g in gates:
            if g["name"] in pooled or "expert_modules" not in g:
                continue
            if _unmapped(g):
                out.append(_entry("similarity", g["name"], _why_unmapped(g), MAP_FIX))
            elif g.get("fused_experts"):
                out.append(_entry("similarity", g["name"], "its experts are fused (slices of [E, ...] parameters), "
                                  "which expert similarity does not measure", "none yet"))
    return out


def _unmapped(gate: dict[str, Any]) -> bool:
    return "expert_modules" in gate and not gate.get("expert_modules") and not gate.get("fused_experts")


def _why_unmapped(gate: dict[str, Any]) -> str:
    return str(gate.get("expert_map") or "the gate produced no output in training mode, so its experts were never "
                                         "looked for")


def _entry(view: str, gate: str | None, reason: str, fix: str) -> dict[str, Any]:
    return {"view": view, "gate": gate, "reason": reason, "fix": fix}


def skipped_lines(skipped: list[dict[str, Any]]) -> list[str]:
    """The text report's lines for the ``skipped`` list (none when nothing was skipped)."""
    if not skipped:
        return []
    lines = ["", f"skipped ({len(skipped)}):"]
    for s in skipped:
        who = f" of gate {s['gate']!r}" if s["gate"] is not None else ""
        lines.append(f"  {s['view']}{who}: {s['reason']}")
        if s["fix"] not in ("see the reason", "none yet") and s["fix"] not in s["reason"]:
            lines.append(f"      fix: {s['fix']}")
    return lines
