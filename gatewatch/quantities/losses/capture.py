"""Task losses, capture half: the mean loss of each task per window, and the first step it turned NaN/Inf.

Losses are recorded on the device (a stack and an add per call, no host sync). Slots: ``"sum"`` (the
sum of each task's loss over the window's calls, SUM), ``"calls"`` (how many calls, SUM) and ``"bad"``
(the first step with a non-finite loss per task, MIN); the window mean is sum / calls over all ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from ...capture.quantity import CaptureContext, Quantity, Reduction, Rows, State

KEYWORDS: dict[str, Any] = {}
Losses = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


def build(ctx: CaptureContext) -> TaskLosses:
    return TaskLosses(ctx)


class TaskLosses(Quantity):
    """Per-window task losses (see the module docstring)."""

    name = "losses"
    slots = MappingProxyType({"sum": Reduction.SUM, "calls": Reduction.SUM, "bad": Reduction.MIN})

    def __init__(self, ctx: CaptureContext) -> None:
        self.ctx = ctx
        ctx.loss_tasks = list(ctx.tasks) if ctx.tasks else None
        self._sum: torch.Tensor | None = None
        self._calls = 0
        self._first_bad: torch.Tensor | None = None  # first step with a non-finite loss, per task (NaN-free)
        self._closed: list[tuple[torch.Tensor | None, int, torch.Tensor | None]] = []
        self._seen_bad: set[str] = set()

    def record(self, losses: Losses) -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor]:
        """Check and record this step's task losses; return them in task order and their sum (on the graph)."""
        items = self._named(losses)
        for task, loss in items:
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"The loss of task {task!r} is {shape}, not a scalar tensor: reduce it first "
                                 "(e.g. loss.mean()) and pass one scalar loss per task.")
        values = torch.stack([loss.detach().float().reshape(()) for _, loss in items])
        self._sum = values if self._sum is None else self._sum + values.to(self._sum)
        at = torch.where(torch.isfinite(values), math.inf, float(self.ctx.step + 1))  # no host sync
        self._first_bad = at if self._first_bad is None else torch.minimum(self._first_bad, at)
        self._calls += 1
        total = items[0][1]
        for _, loss in items[1:]:
            total = total + loss
        return items, total

    def _named(self, losses: Losses) -> list[tuple[str, torch.Tensor]]:
        tasks = self.ctx.loss_tasks
        if isinstance(losses, Mapping):
            names = [str(k) for k in losses]
            if tasks is None:
                tasks = self.ctx.loss_tasks = names
            if set(names) != set(tasks):
                raise ValueError(f"losses has tasks {sorted(names)} but the watch expects {tasks}: pass one loss per "
                                 "task, keyed by the task names given to GateWatch(tasks=...).")
            return [(t, losses[t]) for t in tasks]
        items = list(losses)
        if tasks is None:
            tasks = self.ctx.loss_tasks = [f"task{i}" for i in range(len(items))]
        if len(items) != len(tasks):
            raise ValueError(f"Got {len(items)} losses for tasks {tasks}; pass one per task.")
        return list(zip(tasks, items, strict=True))

    @property
    def open_calls(self) -> int:
        """Loss calls of the open window."""
        return self._calls

    def on_window(self, step: int) -> None:
        self._closed.append((self._sum, self._calls, self._first_bad))
        self._sum, self._calls, self._first_bad = None, 0, None

    def collect(self, windows: list[int]) -> dict[str, State]:
        closed, self._closed = self._closed[: len(windows)], self._closed[len(windows) :]
        k = len(self.ctx.loss_tasks or [])
        like = next((s for s, _, _ in closed if s is not None), None)
        if not k or like is None:
            return {}
        zeros, none = torch.zeros(k, device=like.device), torch.full((k,), math.inf, device=like.device)
        sums = torch.stack([s if s is not None else zeros for s, _, _ in closed])
        bad = torch.stack([b if b is not None else none for _, _, b in closed])
        calls = torch.tensor([[float(c)] for _, c, _ in closed])
        return {"sum": State(sums, Reduction.SUM), "calls": State(calls, Reduction.SUM),
                "bad": State(bad, Reduction.MIN)}

    def rows(self, windows: list[int], host: dict[str, np.ndarray]) -> Rows:
        if "sum" not in host:
            return {}
        k = host["sum"].shape[1]
        if self.ctx.loss_tasks is None:  # losses logged on another rank only
            self.ctx.loss_tasks = [f"task{i}" for i in range(k)]
        rows: dict[str, list[dict[str, Any]]] = {"losses": [], "events": []}
        for w, step in enumerate(windows):
            calls = float(host["calls"][w, 0])
            if not calls:
                continue
            for task, total, bad in zip(self.ctx.loss_tasks, host["sum"][w], host["bad"][w], strict=True):
                loss = float(total) / calls
                rows["losses"].append({"step": step, "task": task, "loss": loss})
                if not math.isfinite(loss) and task not in self._seen_bad:
                    self._seen_bad.add(task)
                    rows["events"].append(self._event(task, step, bad))
        return rows

    @staticmethod
    def _event(task: str, step: int, bad: float) -> dict[str, Any]:
        """The event of a task whose window mean loss turned non-finite first, at its exact first step."""
        at = int(bad) if math.isfinite(bad) and bad <= step else step  # under DDP the bad loss may be another rank's
        return {"step": at, "kind": "nonfinite_loss", "source": task,
                "message": f"the loss of task {task!r} was NaN/Inf first at step {at}; the mean loss of each window "
                           "holding it is NaN/Inf too (the gate statistics are not affected)."}
