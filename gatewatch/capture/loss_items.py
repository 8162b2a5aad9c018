"""The task losses a loop hands to the watch (``log_losses``, ``backward``, ``task_gradients``): checked, named and
summed once, then given to every quantity (``Quantity.on_losses``, ``Quantity.around_backward``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .quantity import CaptureContext, LossItems

Losses = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


def loss_items(ctx: CaptureContext, losses: Losses) -> tuple[LossItems, torch.Tensor]:
    """``losses`` as ``(task, loss)`` in task order, and their sum (on the graph). The first call fixes the task
    names when ``GateWatch(tasks=...)`` did not (``ctx.loss_tasks``)."""
    items = _named(ctx, losses)
    for task, loss in items:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"The loss of task {task!r} is {shape}, not a scalar tensor: reduce it first "
                             "(e.g. loss.mean()) and pass one scalar loss per task.")
    total = items[0][1]
    for _, loss in items[1:]:
        total = total + loss
    return items, total


def _named(ctx: CaptureContext, losses: Losses) -> LossItems:
    tasks = ctx.loss_tasks if ctx.loss_tasks is not None else ctx.tasks
    if isinstance(losses, Mapping):
        names = [str(k) for k in losses]
        if tasks is None:
            tasks = names
        if set(names) != set(tasks):
            raise ValueError(f"losses has tasks {sorted(names)} but the watch expects {tasks}: pass one loss per "
                             "task, keyed by the task names given to GateWatch(tasks=...).")
        ctx.loss_tasks = list(tasks)
        return [(t, losses[t]) for t in tasks]
    items = list(losses)
    if tasks is None:
        tasks = [f"task{i}" for i in range(len(items))]
    if len(items) != len(tasks):
        raise ValueError(f"Got {len(items)} losses for tasks {tasks}; pass one per task.")
    ctx.loss_tasks = list(tasks)
    return list(zip(tasks, items, strict=True))
