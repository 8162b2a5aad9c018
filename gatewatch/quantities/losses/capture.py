"""Task losses, capture half: the mean loss of each task per window, and the first step it turned NaN/Inf.

Each call (``Quantity.on_losses``) keeps a detached reference to each task's loss in a
:class:`~gatewatch.capture.window_buffer.WindowBuffer` (no device op, no host sync; a loss that is a view into a
larger tensor is copied); the flush reduces the calls of all windows at once, on the device. Calls held in the
open window are capped (``FOLD_CALLS``): beyond that they are reduced early, so a loop that logs losses without
``step()`` stays bounded.

States: ``"sum"`` (the sum of each task's loss over the window's calls, SUM), ``"calls"`` (how many calls, SUM)
and ``"bad"`` (the first step with a non-finite loss per task, MIN); the window mean is sum / calls over all ranks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ...capture.loss_items import Losses
from ...capture.quantity import CaptureContext, LossItems, Quantity, Reduction, Rows, to_device
from ...capture.window_buffer import Slot, WindowBuffer

__all__ = ["FOLD_CALLS", "KEYWORDS", "Losses", "TaskLosses", "build"]

KEYWORDS: dict[str, Any] = {}
FOLD_CALLS = 1024  # loss calls held in the open window; above: reduced early


def build(ctx: CaptureContext) -> TaskLosses:
    return TaskLosses(ctx)


class TaskLosses(Quantity):
    """Per-window task losses (see the module docstring)."""

    name = "losses"

    def __init__(self, ctx: CaptureContext) -> None:
        self.ctx = ctx
        ctx.loss_tasks = list(ctx.tasks) if ctx.tasks else None
        self.add_state("sum", Reduction.SUM)
        self.add_state("calls", Reduction.SUM)
        self.add_state("bad", Reduction.MIN)
        self.buffer = WindowBuffer(self, ctx, _reduce, window_calls=FOLD_CALLS)
        self._seen_bad: set[str] = set()

    def on_losses(self, items: LossItems, step: int) -> None:
        self.buffer.hold([_held(loss) for _, loss in items])

    @property
    def open_calls(self) -> int:
        """Loss calls of the open window."""
        return self.buffer.open_calls

    def late(self) -> bool:
        return self.open_calls > 0

    def on_window(self, step: int) -> None:
        self.buffer.on_window(step)

    def collect(self, windows: list[int]) -> dict[str, torch.Tensor]:
        return self.buffer.collect(len(windows))

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


def _reduce(held: list[tuple[Slot, int, list[torch.Tensor]]]) -> list[tuple[str, list[Slot], torch.Tensor]]:
    """The calls as rows: each task's loss (float32), one call, and the step where a loss is NaN/Inf (inf where
    finite)."""
    values = torch.stack([t.reshape(()).float() for _, _, losses in held for t in losses]).reshape(len(held), -1)
    steps = to_device([float(step) for _, step, _ in held], torch.float32, values.device)
    slots = [slot for slot, _, _ in held]
    return [("sum", slots, values), ("calls", slots, torch.ones(len(held), 1, device=values.device)),
            ("bad", slots, torch.where(torch.isfinite(values), math.inf, steps[:, None]))]
