"""Online guard, capture half: runs the guarded finding rules on each flush's reduced tables and applies or
removes gate dropout (see :mod:`gatewatch.guard`). It keeps no device state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ...capture.quantity import CaptureContext, Quantity, Rows
from ...guard import Guard
from ...loaded_run import Run
from ...masking import GateMasks, dropout_keep
from ...rules import Thresholds
from ...schema import frame
from ..gates.read import expert_findings, gate_findings

KEYWORDS: dict[str, Any] = {"guard": None}


def build(ctx: CaptureContext) -> GateGuard | None:
    spec = ctx.options["guard"]
    if spec is None:
        return None
    if not isinstance(spec, Guard):
        raise TypeError(f"guard= takes gw.Guard(rules=..., dropout=..., revert_after=...); got {type(spec).__name__}.")
    return GateGuard(ctx, spec)


class GateGuard(Quantity):
    """The guard of one watch: ``watch.guard``. :meth:`revert` removes every dropout it applied."""

    name = "guard"

    def __init__(self, ctx: CaptureContext, spec: Guard, thresholds: Thresholds | None = None) -> None:
        self.ctx, self.spec, self.thresholds = ctx, spec, thresholds or Thresholds()
        self.masks: dict[str, GateMasks] = {}  # gate name -> its active dropout
        self.windows: dict[str, int] = {}  # gate name -> windows seen since its dropout began
        self.events: list[dict[str, Any]] = []
        self._news: list[dict[str, Any]] = []  # rows of the events table not written yet
        self._generator = torch.Generator().manual_seed(0)

    @property
    def active(self) -> list[str]:
        """The gates under dropout now."""
        return list(self.masks)

    def after(self, tables: dict[str, pd.DataFrame]) -> Rows:
        """Decide from this flush's reduced tables: note the numbers after earlier actions, revert the dropouts
        that have run ``revert_after`` windows, apply dropout where a guarded rule fires."""
        gates = tables.get("gates", frame("gates")).dropna(subset=["samples"])
        gates = gates[gates["samples"] > 0]
        if len(gates):
            last = gates.sort_values("step").groupby("gate").tail(1).set_index("gate")
            for event in self.events:
                if event["after"] is None and event["gate"] in last.index:
                    event["after"] = _numbers(last.loc[event["gate"]])
            reverted = set()
            for name in list(self.masks):
                self.windows[name] += int(gates.loc[gates["gate"] == name, "step"].nunique())
                if self.spec.revert_after is not None and self.windows[name] >= self.spec.revert_after:
                    self._revert(name, f"revert_after={self.spec.revert_after} windows", last)
                    reverted.add(name)  # not re-applied at the flush that removed it
            for rule, targets, message in self._fired(tables):
                for name in [t for t in targets if t not in self.masks and t not in reverted and t in last.index]:
                    self._apply(name, rule, message, last.loc[name])
        news, self._news = self._news, []
        return {"events": news}

    def _fired(self, tables: dict[str, pd.DataFrame]) -> list[tuple[str, list[str], str]]:
        """(rule, gates concerned, message) of the guarded findings of these windows."""
        meta = {"gates": [g.describe() for g in self.ctx.gates], "tasks": self.ctx.tasks}
        run = Run.of_tables(Path("."), meta, tables, status="live")
        names = [g.name for g in self.ctx.gates]
        found = [f for rule in (gate_findings, expert_findings) for f in rule(run, self.thresholds)]
        return [(f.code, [f.gate] if f.gate else names, f.message) for f in found if f.code in self.spec.rules]

    def _apply(self, name: str, rule: str, why: str, row: pd.Series) -> None:
        gate = next(g for g in self.ctx.gates if g.name == name)
        rate, generator = float(self.spec.dropout), self._generator

        def keep(t: torch.Tensor) -> torch.Tensor:
            return dropout_keep(t, rate, generator if t.device.type == "cpu" else None)

        self.masks[name] = GateMasks(self.ctx.model, {name: keep}, gates=[gate], training_only=True).apply()
        self.windows[name] = 0
        self._record(rule, name, "dropout", why, _numbers(row))

    def _revert(self, name: str, why: str, last: pd.DataFrame | None = None) -> None:
        self.masks.pop(name).remove()
        self.windows.pop(name, None)
        before = _numbers(last.loc[name]) if last is not None and name in last.index else None
        self._record("revert", name, "revert", why, before)

    def revert(self) -> None:
        """Remove every dropout the guard applied (recorded as an event at the next flush)."""
        for name in list(self.masks):
            self._revert(name, "watch.guard.revert()")

    def _record(self, rule: str, gate: str, action: str, why: str, before: dict[str, Any] | None) -> None:
        step = int(self.ctx.step)
        rate = float(self.spec.dropout) if action == "dropout" else 0.0
        self.events.append({"step": step, "rule": rule, "gate": gate, "action": action, "rate": rate, "why": why,
                            "before": before, "after": None})
        text = (f"guard: gate dropout {rate:g} on gate {gate!r} ({rule}: {why})" if action == "dropout"
                else f"guard: gate dropout on gate {gate!r} removed ({why})")
        self._news.append({"step": step, "kind": "guard", "source": gate, "message": text})

    def describe(self) -> dict[str, Any]:
        return {"guard": {**self.spec.describe(), "active": self.active, "events": self.events}}

    def detach(self) -> None:
        super().detach()
        for masks in self.masks.values():
            masks.remove()
        self.masks.clear()


def _numbers(row: pd.Series) -> dict[str, Any]:
    return {"step": int(row["step"]), "top_share": float(row["top_share"]),
            "effective_experts": float(row["effective_experts"])}
