"""A saved run as the target of an ablation: its model rebuilt from the checkpoint, its gates and its data.

Everything is validated (checkpoint, factory, data, gates, one forward pass) before an ablation starts,
so bad input raises AblationError and writes nothing. :func:`run_and_save` then runs the ablation as a
job of the run and writes its result.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..gating.specs import Gate, GateDiscoveryError, GateOutputError, ResolvedGate
from ..masking import GateSpecs, count_experts, resolve_gates
from ..run_reader import read_meta
from ..training import CheckpointError, load_dataset, load_model
from .errors import AblationError
from .evaluation import EvalFn, evaluator
from .jobs import Progress, StopFn, Tracking
from .store import write_result


@dataclass
class Target:
    """A run's model rebuilt from its checkpoint, its gates, and the evaluation data."""

    run_dir: Path
    model: nn.Module
    gates: list[ResolvedGate]
    tasks: list[str]
    task_types: list[str]
    data: dict[str, Any]
    split: str
    x: torch.Tensor
    y: torch.Tensor
    factory: str | None
    kwargs: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def evaluate(self) -> EvalFn:
        return evaluator(self.x, self.y, self.tasks, self.task_types)


def gate_specs(meta: Mapping[str, Any]) -> dict[str, Gate] | None:
    """The gates a run's GateWatch recorded in run.json, as specs (None when it recorded none, or sparse routers:
    those are found again with their scoring and choice, named by their paths as they were)."""
    recorded = [g for g in meta.get("gates") or [] if isinstance(g, dict) and g.get("name") and g.get("path")]
    if not recorded or any(g.get("scoring") for g in recorded):
        return None
    return {g["name"]: Gate(g["path"], output=g.get("output") or "probs", task=g.get("task"), level=g.get("level"),
                            experts=g.get("expert_names")) for g in recorded}


def run_gates(model: nn.Module, meta: Mapping[str, Any], tasks: Sequence[str]) -> list[ResolvedGate]:
    """The gates of the rebuilt model: those recorded in run.json (same names), else discovered."""
    specs = gate_specs(meta)
    try:
        return resolve_gates(model, tasks or None, specs)
    except GateDiscoveryError as err:
        if specs is None:
            raise AblationError(f"Cannot find the gates of the rebuilt {type(model).__name__}: {err}") from err
        raise AblationError(
            f"run.json records gates at {[s.module for s in specs.values()]}, but the rebuilt "
            f"{type(model).__name__} does not have them ({err}). The checkpoint's model is not the model this run "
            "watched: pass the factory that built it (--factory module:function)."
        ) from err


def load_target(
    run_dir: str | os.PathLike[str],
    *,
    factory: str | None = None,
    allow_factory: bool = False,
    split: str = "val",
    gates: GateSpecs = None,
) -> Target:
    """Rebuild a run's model from its checkpoint and load its evaluation split; raise AblationError on bad input."""
    path = Path(run_dir)
    if split not in ("train", "val", "test"):
        raise AblationError(f"split must be 'train', 'val' or 'test', got {split!r}.")
    if not path.is_dir():
        raise AblationError(f"{path} is not a folder; pass a run directory.")
    try:
        model, info = load_model(path, factory, allow_factory=allow_factory)
    except CheckpointError as err:
        raise AblationError(str(err)) from err
    meta, _ = read_meta(path)
    if info.data is None:
        raise AblationError(
            f"{path}/model.json has no data reference, so the evaluation data is unknown. Save the run with "
            "save_model(..., data=splits.ref), or use the Python API (gatewatch.ablation.knockout) with your data."
        )
    try:
        splits = load_dataset(info.data["name"], **dict(info.data.get("kwargs") or {}))
    except (KeyError, TypeError, ValueError, OSError) as err:
        raise AblationError(f"Cannot load the run's data {info.data}: {err}") from err
    tasks = info.tasks or splits.tasks
    if list(splits.tasks) != list(tasks):
        raise AblationError(f"The run's model predicts tasks {tasks} but its data set has tasks {splits.tasks}.")
    try:
        resolved = resolve_gates(model, tasks, gates) if gates is not None else run_gates(model, meta, tasks)
    except (GateDiscoveryError, KeyError, TypeError) as err:
        raise AblationError(str(err)) from err
    x, y = getattr(splits, f"x_{split}"), getattr(splits, f"y_{split}")
    target = Target(path, model, resolved, list(tasks), list(info.task_types or splits.task_types),
                    dict(info.data), split, x, y, info.factory, dict(info.kwargs), meta)
    _check_runs(target)
    return target


def _check_runs(target: Target) -> None:
    """One forward pass on a few rows: the model must return one output per task and every gate must fire."""
    model, x = target.model, target.x[:8]
    try:
        with torch.no_grad():
            count_experts(model, target.gates, lambda: _check_outputs(model(x), target.tasks))
    except (GateOutputError, RuntimeError, TypeError, ValueError) as err:
        raise AblationError(
            f"The rebuilt {type(model).__name__} does not run on the run's data: {type(err).__name__}: {err}"
        ) from err


def _check_outputs(outputs: Any, tasks: Sequence[str]) -> None:
    if not isinstance(outputs, (list, tuple)) or len(outputs) != len(tasks):
        n = len(outputs) if isinstance(outputs, (list, tuple)) else type(outputs).__name__
        raise ValueError(f"the model returned {n} outputs for {len(tasks)} tasks {list(tasks)}")


def result_settings(target: Target, **extra: Any) -> dict[str, Any]:
    """The settings stored with a result: what was ablated, on which data, when, and ``extra``."""
    return {"split": target.split, "factory": target.factory, "kwargs": target.kwargs, "data": target.data,
            "gates": [g.name for g in target.gates], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}


def run_and_save(target: Target, kind: str, tracking: Tracking | None,
                 work: Callable[[Progress, StopFn], pd.DataFrame], **settings: Any) -> pd.DataFrame:
    """Run ``work(progress, should_stop)`` as the run's ``kind`` job and write what it returns as the result.

    ``settings`` are stored with it (see :func:`result_settings`). A stopped or failed job writes nothing.
    """
    context, progress, should_stop = (tracking or Tracking()).start(target.run_dir, kind)
    with context:
        df = work(progress, should_stop)
        write_result(target.run_dir, kind, df, result_settings(target, **settings))
    return df
