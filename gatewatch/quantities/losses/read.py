"""Task losses, read half: the ``losses`` table and the rule for a loss that became NaN/Inf."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import pandas as pd

from ...declarations import Add, ReadHalf, table_rows
from ...rules import Finding, Thresholds

if TYPE_CHECKING:
    from ...loaded_run import Run

TABLES: dict[str, dict[str, str]] = {
    # mean task loss per window (from watch.backward / watch.log_losses)
    "losses": {"step": "int64", "task": "string", "loss": "float64"},
}

NONFINITE_VALUE_REMEDY = (
    "Find what overflowed at that step: lower the learning rate, clip gradients, check the inputs and the loss "
    "for log(0) or division by zero, and keep the loss in float32 under mixed precision (a GradScaler skips "
    "such steps on its own)."
)
REMEDY_TEXTS = {"nonfinite_loss": NONFINITE_VALUE_REMEDY}


def first_nonfinite(pairs: list[tuple[object, object]]) -> dict[str, int]:
    """The first step of each task among ``(task, step)`` pairs."""
    first: dict[str, int] = {}
    for task, step in pairs:
        first[str(task)] = min(first.get(str(task), int(step)), int(step))  # type: ignore[call-overload]
    return first


def nonfinite_finding(what: str, task: str, step: int) -> Finding:
    """The ``nonfinite`` finding of a task's loss or gradient."""
    note = " (a measured conflict step; it may have started earlier)." if what == "gradient" else "."
    return Finding("nonfinite", "error", None, task, step, f"the {what} of task {task!r} became NaN/Inf at step "
                   f"{step}{note}", NONFINITE_VALUE_REMEDY, "conflict" if what == "gradient" else "overview")


def loss_findings(run: Run, th: Thresholds) -> list[Finding]:
    """A task whose loss became NaN/Inf (``nonfinite_loss`` events, else NaN window means in ``losses``)."""
    events = run.events[run.events["kind"] == "nonfinite_loss"]
    losses = run.losses[~run.losses["loss"].astype("float64").abs().lt(math.inf)]
    first = first_nonfinite([*zip(events["source"], events["step"], strict=True),
                             *zip(losses["task"], losses["step"], strict=True)])
    return [nonfinite_finding("loss", task, step) for task, step in first.items()]


def loss_scalars(tables: Mapping[str, pd.DataFrame], add: Add) -> None:
    """``loss/<task>``."""
    for row in table_rows(tables, "losses"):
        add(f"loss/{row.task}", row.loss, row.step)


QUANTITY = ReadHalf(tables=TABLES, windowed=("losses",), scalars=loss_scalars, rules=(loss_findings,),
                    remedy_texts=REMEDY_TEXTS)
