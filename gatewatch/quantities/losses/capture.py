"""Task losses, capture half: the mean loss of each task per window, and the first step it turned NaN/Inf.

A call keeps a detached reference to each task's loss (no device op, no host sync; a loss that is a view into
a larger tensor is copied); the flush reduces the calls of all windows at once, on the device. Calls held in the
open window are capped (``FOLD_CALLS``): beyond that they are reduced early, so a loop that logs losses without
``step()`` stays bounded.

Slots: ``"sum"`` (the sum of each task's loss over the window's calls, SUM), ``"calls"`` (how many calls, SUM)
and ``"bad"`` (the first step with a non-finite loss per task, MIN); the window mean is sum / calls over all ranks.
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
FOLD_CALLS = 1024  # loss calls held in the open window; above: reduced early
Losses = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
Calls = list[tuple[int, list[torch.Tensor]]]  # (step, detached loss of each task) per call


def build(ctx: CaptureContext) -> TaskLosses:
    return TaskLosses(ctx)


class TaskLosses(Quantity):
    """Per-window task losses (see the module docstring)."""

    name = "losses"
    slots = MappingProxyType({"sum": Reduction.SUM, "calls": Reduction.SUM, "bad": Reduction.MIN})

    def __init__(self, ctx: CaptureContext) -> None:
        self.ctx = ctx
        ctx.loss_tasks = list(ctx.tasks) if ctx.tasks else None
        self._open: Calls = []
        self._folded: tuple[torch.Tensor, torch.Tensor] | None = None  # (sum, first bad) of calls reduced early
        self._calls = 0
        self._closed: list[tuple[Calls, tuple[torch.Tensor, torch.Tensor] | None, int]] = []
        self._seen_bad: set[str] = set()

    def record(self, losses: Losses) -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor]:
        """Check and record this step's task losses; return them in task order and their sum (on the graph)."""
        items = self._named(losses)
        for task, loss in items:
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"The loss of task {task!r} is {shape}, not a scalar tensor: reduce it first "
                                 "(e.g. loss.mean()) and pass one scalar loss per task.")
        self._open.append((self.ctx.step + 1, [_held(loss) for _, loss in items]))
        self._calls += 1
        if len(self._open) > FOLD_CALLS:
            self._fold_open()
        total = items[0][1]
        for _, loss in items[1:]:
            total = total + loss
        return items, total

    def _fold_open(self) -> None:
        """Reduce the calls held in the open window to its running sum and first non-finite step."""
        values, bad = _stacked(self._open)
        total, first = values.sum(0), bad.amin(0)
        if self._folded is not None:
            total, first = total + self._folded[0], torch.minimum(first, self._folded[1])
        self._open, self._folded = [], (total, first)

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
        self._closed.append((self._open, self._folded, self._calls))
        self._open, self._folded, self._calls = [], None, 0

    def collect(self, windows: list[int]) -> dict[str, State]:
        closed, self._closed = self._closed[: len(windows)], self._closed[len(windows) :]
        k = len(self.ctx.loss_tasks or [])
        calls = [(w, call) for w, (held, _, _) in enumerate(closed) for call in held]
        folded = [(w, f) for w, (_, f, _) in enumerate(closed) if f is not None]
        if not k or not (calls or folded):
            return {}
        device = (calls[0][1][1][0] if calls else folded[0][1][0]).device  # of a held loss or a folded sum
        sums = torch.zeros(len(closed), k, device=device)
        bad = torch.full((len(closed), k), math.inf, device=device)
        if calls:
            values, first = _stacked([call for _, call in calls])
            at = torch.tensor([w for w, _ in calls], device=device)
            sums.index_add_(0, at, values)
            bad.scatter_reduce_(0, at[:, None].expand_as(first), first, "amin")
        for w, (total, first) in folded:
            sums[w] += total
            bad[w] = torch.minimum(bad[w], first)
        counts = torch.tensor([[float(c)] for _, _, c in closed])
        return {"sum": State(sums, Reduction.SUM), "calls": State(counts, Reduction.SUM),
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


def _held(loss: torch.Tensor) -> torch.Tensor:
    """The loss detached; copied when it is a view into a larger tensor (whose storage holding it would keep)."""
    held = loss.detach()
    return held if held.untyped_storage().nbytes() <= held.element_size() else held.clone()


def _stacked(calls: Calls) -> tuple[torch.Tensor, torch.Tensor]:
    """The losses of ``calls`` as ``[calls, tasks]`` float32, and for each one its step where it is NaN/Inf
    (inf where finite)."""
    values = torch.stack([t.reshape(()).float() for _, losses in calls for t in losses])
    values = values.reshape(len(calls), -1)
    steps = torch.tensor([float(step) for step, _ in calls], device=values.device)
    return values, torch.where(torch.isfinite(values), math.inf, steps[:, None])
