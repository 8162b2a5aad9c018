"""Expert knock-out: remove each expert from each gate in turn and measure what every task loses.

Tidy columns (:data:`KNOCKOUT_COLUMNS`): gate, gate_task, expert, expert_name, task, metric, base, ablated,
delta (= ablated - base) and harm (delta signed so that positive is worse: -delta for AUC).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import pandas as pd
from torch import nn

from ..gating.specs import ResolvedGate
from ..masking import GateSpecs, count_experts, knock_out, resolve_gates
from .evaluation import EvalFn, eval_mode, evaluate_checked, with_harm
from .jobs import Progress, StopFn, Tracking, tick
from .saved_run import load_target, run_and_save

KNOCKOUT_COLUMNS = ["gate", "gate_task", "expert", "expert_name", "task", "metric", "base", "ablated", "delta",
                    "harm"]


def knockout(
    model: nn.Module,
    evaluate: EvalFn,
    *,
    gates: GateSpecs = None,
    tasks: Sequence[str] | None = None,
    progress: Progress | None = None,
    should_stop: StopFn | None = None,
) -> pd.DataFrame:
    """Knock every expert out of every gate in turn and measure each task's metrics against the full model.

    ``evaluate(model) -> {task: {metric: value}}`` (e.g. :func:`evaluator`). The model is evaluated in
    eval mode and left in the mode it was in.
    """
    resolved = resolve_gates(model, tasks, gates)
    with eval_mode(model):
        base: dict[str, dict[str, float]] = {}
        experts = count_experts(model, resolved, lambda: base.update(evaluate_checked(model, evaluate, "")))
        total = sum(experts.values())
        rows: list[dict[str, Any]] = []
        done = 0
        for gate in resolved:
            names = gate.expert_names() or [str(i) for i in range(experts[gate.name])]
            for e in range(experts[gate.name]):
                tick(progress, should_stop, done, total, f"knocking out expert {names[e]} of gate {gate.name}")
                with knock_out(model, {gate.name: [e]}, gates=resolved):
                    ablated = evaluate_checked(model, evaluate, f"with expert {e} of gate {gate.name!r} knocked out")
                rows += [
                    {"gate": gate.name, "gate_task": gate.task, "expert": e, "expert_name": names[e], "task": task,
                     "metric": metric, "base": value, "ablated": ablated.get(task, {}).get(metric, math.nan),
                     "delta": ablated.get(task, {}).get(metric, math.nan) - value}
                    for task, values in base.items() for metric, value in values.items()
                ]
                done += 1
        tick(progress, None, done, total, "done")
    df = with_harm(pd.DataFrame(rows, columns=KNOCKOUT_COLUMNS[:-1]))
    _warn_inert(df, resolved)
    return df.astype({"expert": "int64"})


def _warn_inert(df: pd.DataFrame, gates: Sequence[ResolvedGate]) -> None:
    """Warn about gates whose knock-outs changed no metric at all: the mask did not reach the model."""
    unchanged = df.groupby("gate", sort=False)["delta"].apply(lambda d: bool((d.fillna(0) == 0).all()))
    for gate in (g for g in gates if unchanged.get(g.name, False)):
        hint = (" It returns a richer output picked by extract=: if the model uses other parts of it (e.g. a "
                "router's top-k weights), pass gw.Gate(..., inject=fn) that rebuilds them from the masked tensor."
                if gate.extract is not None else "")
        warnings.warn(f"Knocking experts out of gate {gate.name!r} ({gate.path}) changed no metric: the model does "
                      f"not use this module's output as its gate weights.{hint}", RuntimeWarning, stacklevel=3)


def run_knockout(
    run_dir: str | os.PathLike[str], *, factory: str | None = None, allow_factory: bool = False, split: str = "val",
    tracking: Tracking | None = None,
) -> pd.DataFrame:
    """Knock-out matrix of a saved run, written to ``RUN/ablations/knockout.parquet``.

    Everything is validated (checkpoint, factory, data, gates) before anything is written.
    """
    target = load_target(run_dir, factory=factory, allow_factory=allow_factory, split=split)
    return run_and_save(target, "knockout", tracking, lambda progress, should_stop: knockout(
        target.model, target.evaluate, gates=target.gates, progress=progress, should_stop=should_stop))
