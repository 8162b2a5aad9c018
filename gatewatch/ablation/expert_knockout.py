"""Expert knock-out: remove each expert from each gate in turn and measure what every task loses.

Tidy columns (:data:`KNOCKOUT_COLUMNS`): gate, gate_task, expert, expert_name, task, metric, base, ablated,
delta (= ablated - base), harm (delta signed so that positive is worse: -delta for AUC), load (the expert's
share of the gate in the unmasked evaluation: of the tokens' top-k choices for a router, of the mean weight for
a dense gate) and ablated_load (its share in the evaluation with it knocked out: 0 when the mask reaches the gate).

On a router the knocked-out expert's logit is set to -inf before the top-k (:mod:`gatewatch.masking`), so its
tokens go to their next choice. A sparse MoE of 48 layers x 128 experts would take 6,144 evaluations: ``per_gate=n``
knocks out only the n most and the n least loaded experts of each gate, ``experts=[...]`` only the experts with
these indices, ``only=[...]`` only the experts of the gates named.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..gating.specs import ResolvedGate
from ..masking import GateSpecs, count_experts, gates_by_name, knock_out, resolve_gates
from ..validate import positive_int
from .errors import AblationError
from .evaluation import EvalFn, eval_mode, evaluate_checked, with_harm
from .jobs import Progress, StopFn, Tracking, tick
from .rates import auto_per_gate
from .saved_run import load_target, run_and_save

KNOCKOUT_COLUMNS = ["gate", "gate_task", "expert", "expert_name", "task", "metric", "base", "ablated", "delta",
                    "harm", "load", "ablated_load"]


def _load_hook(gate: ResolvedGate, loads: dict[str, torch.Tensor]) -> Callable[..., None]:
    """A forward hook adding the gate's load to ``loads[gate.name]``: its routers' top-k choices counted per
    expert, or a dense gate's weights summed per expert."""
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if gate.router is not None:
            idx, mask = gate.router.dispatch(output)
            e = int(gate.to_probs(output).shape[-1])
            counts = mask.sum(0).float() if mask is not None else torch.bincount(idx.reshape(-1), minlength=e).float()
        else:
            counts = gate.to_probs(output).reshape(-1, gate.to_probs(output).shape[-1]).float().sum(0)
        loads[gate.name] = loads[gate.name] + counts.cpu() if gate.name in loads else counts.cpu()

    return hook


def chosen_experts(loads: dict[str, torch.Tensor], per_gate: int | None,
                   experts: Sequence[int] | None = None) -> dict[str, list[int]]:
    """Per gate, the experts to knock out: all of them, the ``per_gate`` most and least loaded (most first), or
    the ``experts`` given (by index)."""
    out = {}
    for name, load in loads.items():
        if experts is not None:
            out[name] = list(experts)
            continue
        order = torch.argsort(load, descending=True, stable=True).tolist()
        out[name] = order if per_gate is None or 2 * per_gate >= len(order) else \
            order[:per_gate] + order[-per_gate:]
    return out


def knockout(
    model: nn.Module,
    evaluate: EvalFn,
    *,
    gates: GateSpecs = None,
    tasks: Sequence[str] | None = None,
    only: Iterable[str] | None = None,
    per_gate: int | None = None,
    experts: Iterable[int] | None = None,
    progress: Progress | None = None,
    should_stop: StopFn | None = None,
) -> pd.DataFrame:
    """Knock experts out of gates one at a time and measure each task's metrics against the full model.

    ``evaluate(model) -> {task: {metric: value}}`` (e.g. :func:`evaluator`). Every expert of every gate by
    default; ``only``: the gates whose experts are knocked out; ``per_gate=n``: only the n most and n least
    loaded experts of each; ``experts``: only the experts with these indices (ValueError when a gate has fewer).
    Each row also holds the expert's load with it knocked out (``ablated_load``), measured in that evaluation.
    The progress messages carry an estimate of the time left (from the first evaluations). The model is evaluated
    in eval mode and left in the mode it was in.
    """
    resolved = resolve_gates(model, tasks, gates)
    only = list(only) if only is not None else None
    named = set(gates_by_name(resolved, only)) & set(only) if only is not None else None
    if per_gate is not None:
        per_gate = positive_int("per_gate", per_gate, unit="experts of each end of the load order")
    chosen_gates = [g for g in resolved if named is None or g.name in named]
    if experts is not None and per_gate is not None:
        raise ValueError("Pass per_gate or experts, not both.")
    with eval_mode(model):
        base: dict[str, dict[str, float]] = {}
        loads: dict[str, torch.Tensor] = {}
        handles = [g.module.register_forward_hook(_load_hook(g, loads)) for g in chosen_gates]
        started = time.perf_counter()
        try:
            count_experts(model, resolved, lambda: base.update(evaluate_checked(model, evaluate, "")))
        finally:
            for handle in handles:
                handle.remove()
        each = time.perf_counter() - started
        if experts is not None:  # the gates know their experts once the model has run
            experts = _check_experts(experts, chosen_gates)
        plan = chosen_experts({g.name: loads[g.name] for g in chosen_gates}, per_gate, experts)
        total = sum(len(v) for v in plan.values())
        rows: list[dict[str, Any]] = []
        done = 0
        for gate in chosen_gates:
            names = gate.expert_names() or [str(i) for i in range(len(loads[gate.name]))]
            share = (loads[gate.name] / loads[gate.name].sum().clamp_min(1e-12)).tolist()
            for e in plan[gate.name]:
                tick(progress, should_stop, done, total, f"knocking out expert {names[e]} of gate {gate.name} "
                     f"(about {_duration(each * (total - done))} left)")
                started = time.perf_counter()
                masked: dict[str, torch.Tensor] = {}
                with knock_out(model, {gate.name: [e]}, gates=resolved):  # the hook sees the masked output
                    handle = gate.module.register_forward_hook(_load_hook(gate, masked))
                    try:
                        ablated = evaluate_checked(model, evaluate,
                                                   f"with expert {e} of gate {gate.name!r} knocked out")
                    finally:
                        handle.remove()
                ablated_load = float(masked[gate.name][e] / masked[gate.name].sum().clamp_min(1e-12))
                each = 0.5 * each + 0.5 * (time.perf_counter() - started)
                rows += [
                    {"gate": gate.name, "gate_task": gate.task, "expert": e, "expert_name": names[e], "task": task,
                     "metric": metric, "base": value, "ablated": ablated.get(task, {}).get(metric, math.nan),
                     "delta": ablated.get(task, {}).get(metric, math.nan) - value, "load": share[e],
                     "ablated_load": ablated_load}
                    for task, values in base.items() for metric, value in values.items()
                ]
                done += 1
        tick(progress, None, done, total, "done")
    df = with_harm(pd.DataFrame(rows, columns=[c for c in KNOCKOUT_COLUMNS if c != "harm"]))
    _warn_inert(df, chosen_gates)
    return df[KNOCKOUT_COLUMNS].astype({"expert": "int64"})


def _check_experts(experts: Iterable[int], gates: Sequence[ResolvedGate]) -> list[int]:
    """Distinct expert indices that every one of ``gates`` has; ValueError naming the gate otherwise."""
    out = list(dict.fromkeys(experts))
    if not out or any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in out):
        raise ValueError(f"experts are expert indices >= 0, got {out!r}.")
    for gate in gates:
        n = gate.n_experts
        if n is not None and max(out) >= n:
            raise ValueError(f"Gate {gate.name!r} has {n} experts (0..{n - 1}), so expert {max(out)} cannot be "
                             "knocked out of it: pass indices below that, or name other gates.")
    return out


def _duration(seconds: float) -> str:
    """``seconds`` as a rounded duration: 40 s, 3 min, 1.5 h."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


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
    only: Iterable[str] | None = None, per_gate: int | str | None = "auto", experts: Iterable[int] | None = None,
    tracking: Tracking | None = None,
) -> pd.DataFrame:
    """Knock-out matrix of a saved run, written to ``RUN/ablations/knockout.parquet`` (``only``, ``per_gate``: as
    for :func:`knockout`; ``per_gate="auto"``: :func:`~gatewatch.ablation.rates.auto_per_gate`, every expert when
    that is at most 256 evaluations, else the 2 most and 2 least loaded experts of each gate; ``experts``: only
    these expert indices of each gate, in place of ``per_gate``).

    Everything is validated (checkpoint, factory, data, gates, the gates named) before anything is written.
    """
    target = load_target(run_dir, factory=factory, allow_factory=allow_factory, split=split)
    only = list(only) if only is not None else None
    try:
        gates_by_name(target.gates, only or [])
    except KeyError as err:
        raise AblationError(str(err.args[0])) from None
    experts = list(experts) if experts is not None else None
    if experts is not None:
        try:
            _check_experts(experts, [g for g in target.gates if only is None or g.name in only])
        except ValueError as err:
            raise AblationError(str(err)) from None
        per_gate = None
    elif per_gate == "auto":
        per_gate = auto_per_gate([(g.name, int(g.n_experts or 0)) for g in target.gates], only)
    elif per_gate is not None and (isinstance(per_gate, bool) or not isinstance(per_gate, int) or per_gate < 1):
        raise AblationError(f"per_gate is a number of experts >= 1, None (all) or 'auto', got {per_gate!r}.")
    return run_and_save(target, "knockout", tracking, lambda progress, should_stop: knockout(
        target.model, target.evaluate, gates=target.gates, only=only, per_gate=per_gate, experts=experts,
        progress=progress, should_stop=should_stop), only=list(only) if only is not None else None,
        per_gate=per_gate, experts=experts)
