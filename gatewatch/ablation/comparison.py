"""Training comparison: retrain a saved run's model on its data at several gate dropout rates and seeds.

The children are real runs (GateWatch attached), saved under ``RUN/ablations/train/rate-<r>-seed-<s>/``;
their final metrics and gate health make ``RUN/ablations/train.parquet`` (:data:`TRAIN_COLUMNS`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from ..masking import GateSpecs, gate_dropout
from ..report import build_report
from ..run_reader import RunReadError, load_run
from ..training import MODELS, TrainConfig, train
from ..training.checkpoint import resolve_factory
from ..validate import positive_int
from .errors import AblationError, AblationStopped
from .jobs import Progress, StopFn, Tracking, job_dir, tick
from .rates import TRAIN_RATES, TRAIN_SEEDS, TRAIN_STEPS, check_rates, check_seeds
from .saved_run import Target, gate_specs, load_target, run_and_save

TRAIN_COLUMNS = ["rate", "seed", "task", "metric", "split", "value", "polarized_gates", "dead_experts",
                 "mean_entropy", "max_top_share", "steps", "run_dir"]


def child_name(rate: float, seed: int) -> str:
    """The folder of the child run trained at ``rate`` and ``seed``: ``rate-<r>-seed-<s>``."""
    return f"rate-{rate:g}-seed-{seed}"


def gate_health(run_dir: str | os.PathLike[str]) -> dict[str, float]:
    """Polarized gates and dead experts (from the findings) and gate entropy / top share of a run's last window."""
    try:
        run = load_run(run_dir)
    except RunReadError:
        return {"polarized_gates": math.nan, "dead_experts": math.nan, "mean_entropy": math.nan,
                "max_top_share": math.nan}
    report = build_report(run)
    found, last = report["findings"], report["gates"]
    entropies = [g["entropy"] for g in last if g["entropy"] is not None]
    tops = [g["top_share"] for g in last if g["top_share"] is not None]
    return {
        "polarized_gates": float(sum(f["code"] == "polarization" for f in found)),
        "dead_experts": float(sum(f["code"] == "dead_expert" for f in found)),
        "mean_entropy": float(sum(entropies) / len(entropies)) if entropies else math.nan,
        "max_top_share": float(max(tops)) if tops else math.nan,
    }


def child_rows(rate: float, seed: int, run_dir: Path, split: str) -> list[dict[str, Any]]:
    """Rows of :data:`TRAIN_COLUMNS` for one finished child run (its metrics.json and gate health).

    ``run_dir`` is recorded where the child ends up, relative to the parent run: ``ablations/train/<name>``.
    """
    metrics = json.loads((run_dir / "metrics.json").read_text())
    health = gate_health(run_dir)
    rel = str(Path("ablations") / "train" / run_dir.name)
    return [{"rate": rate, "seed": seed, "task": task, "metric": metric, "split": split, "value": float(value),
             "steps": int(metrics.get("steps") or 0), "run_dir": rel, **health}
            for task, values in metrics[split].items() for metric, value in values.items()]


@dataclass
class Comparison:
    """How to train the children of a run: TrainConfig fields and, for a non-reference model, a builder."""

    config: dict[str, Any]
    builder: Callable[..., nn.Module] | None


def _comparison_plan(target: Target, steps: int | None, factory: str | None, allow_factory: bool) -> Comparison:
    """The parent's training settings (run.json) with its data, and how to rebuild its model."""
    user = dict(target.meta.get("user_config") or {})
    config = {k: v for k, v in user.items() if k in {f.name for f in fields(TrainConfig)}}
    config.update(data=target.data["name"], data_kwargs=dict(target.data.get("kwargs") or {}))
    config["steps"] = steps if steps is not None else min(int(config.get("steps") or TRAIN_STEPS), TRAIN_STEPS)
    config.pop("gate_dropout", None)
    cls = MODELS.get(str(config.get("model")))
    if factory is None and cls is not None and target.factory == f"{cls.__module__}:{cls.__qualname__}":
        return Comparison(config, None)
    config.update(model="mmoe", model_kwargs={})  # TrainConfig only checks these; the builder makes the model
    return Comparison(config, _factory_builder(target, factory, allow_factory))


def _factory_builder(target: Target, factory: str | None, allow_factory: bool) -> Callable[..., nn.Module]:
    """A ``model_builder`` for :func:`gatewatch.training.train` that rebuilds the run's own model.

    The model's own ``gate_dropout`` option (if its factory has one) is set to 0: the comparison's rate
    is applied with :func:`gatewatch.masking.gate_dropout` hooks, registered at the first forward pass,
    after GateWatch's capture hooks, so the watch records the gate's own weights (as with GateDropout).
    """
    name = factory or target.factory
    if name is None:
        raise AblationError(f"{target.run_dir} names no model factory; pass factory='module:function'.")
    make = resolve_factory(name, trusted=factory is not None or allow_factory)
    kwargs = {**target.kwargs, **({"gate_dropout": 0.0} if "gate_dropout" in target.kwargs else {})}
    specs = gate_specs(target.meta)

    def build(_splits: Any, config: Any) -> nn.Module:
        model = make(**kwargs)
        if config.gate_dropout:
            _dropout_on_first_forward(model, specs, target.tasks, config.gate_dropout, config.seed)
        return model

    return build


def _dropout_on_first_forward(model: nn.Module, specs: GateSpecs, tasks: Sequence[str], rate: float,
                              seed: int) -> None:
    masks = gate_dropout(model, rate, gates=specs, tasks=tasks, seed=seed)

    def attach(_module: nn.Module, _inputs: Any) -> None:
        handle.remove()
        masks.apply()

    handle = model.register_forward_pre_hook(attach)


def check_retraining(steps: int | None, split: str, what: str) -> int | None:
    """``steps`` (None: the run's own) checked as a positive int, and ``split`` as 'val' or 'test';
    AblationError otherwise (``what`` names the ablation in the message)."""
    if split not in ("val", "test"):
        raise AblationError(f"{what} reports 'val' or 'test' metrics, got split {split!r}.")
    if steps is None:
        return None
    try:
        return positive_int("steps", steps, unit="per training run")
    except ValueError as err:
        raise AblationError(str(err)) from None


def _step_reporter(progress: Progress, offset: int, total: int, name: str) -> Callable[[int, Any], None]:
    return lambda step, _info: progress(offset + step, total, f"training {name}")


def train_comparison(
    run_dir: str | os.PathLike[str],
    *,
    rates: Iterable[float] = TRAIN_RATES,
    seeds: Iterable[int] = TRAIN_SEEDS,
    steps: int | None = None,
    split: str = "val",
    factory: str | None = None,
    allow_factory: bool = False,
    tracking: Tracking | None = None,
) -> pd.DataFrame:
    """Train the run's model on its data at each gate dropout rate and seed; compare metrics and gate health.

    Written to ``RUN/ablations/train.parquet``; the children are real runs, saved under
    ``RUN/ablations/train/rate-<r>-seed-<s>/`` (``run_dir`` column, relative to RUN). They are trained
    in a hidden staging folder and moved into place only when all of them finished, so a stopped or
    failed comparison leaves the previous one intact. ``steps`` defaults to the run's own length,
    capped at :data:`TRAIN_STEPS`. A run of a reference model trained by :func:`gatewatch.training.train`
    is retrained with ``TrainConfig.gate_dropout``; any other model gets gate dropout through masking hooks.
    """
    rates, seeds = check_rates(rates), check_seeds(seeds)
    steps = check_retraining(steps, split, "The comparison")
    target = load_target(run_dir, factory=factory, allow_factory=allow_factory, split=split)
    plan = _comparison_plan(target, steps, factory, allow_factory)
    try:
        configs = {(r, s): TrainConfig(**{**plan.config, "gate_dropout": r, "seed": s, "tensorboard": False})
                   for r in rates for s in seeds}
    except (TypeError, ValueError) as err:
        raise AblationError(f"Cannot train this run again with gate dropout: {err}") from err
    return run_and_save(target, "train", tracking,
                        lambda progress, should_stop: _train_children(target, configs, plan, progress, should_stop),
                        rates=rates, seeds=seeds, steps=plan.config["steps"])


def _train_children(target: Target, configs: dict[tuple[float, int], TrainConfig], plan: Comparison,
                    progress: Progress, should_stop: StopFn) -> pd.DataFrame:
    """Train every child in a staging folder, then publish them all; the rows of :data:`TRAIN_COLUMNS`."""
    parent = job_dir(target.run_dir, "train")
    staging = parent / f".staging-{os.getpid()}"
    total = sum(c.steps for c in configs.values())
    rows: list[dict[str, Any]] = []
    try:
        done = 0
        for (rate, seed), config in configs.items():
            name = child_name(rate, seed)
            tick(progress, should_stop, done, total, f"training {name}")
            train(config, staging / name, progress=False, should_stop=should_stop, model_builder=plan.builder,
                  on_step=_step_reporter(progress, done, total, name))
            if should_stop():
                raise AblationStopped(f"stopped while training {name}")
            done += config.steps
            rows += child_rows(rate, seed, staging / name, target.split)
        _publish(staging, parent, [child_name(r, s) for r, s in configs])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return pd.DataFrame(rows, columns=TRAIN_COLUMNS).astype({"seed": "int64", "steps": "int64"})


def _publish(staging: Path, parent: Path, names: list[str]) -> None:
    """Replace the previous comparison's children by the new ones."""
    for old in parent.glob("rate-*-seed-*"):
        shutil.rmtree(old, ignore_errors=True)
    for name in names:
        os.replace(staging / name, parent / name)
