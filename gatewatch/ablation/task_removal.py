"""Task removal: retrain without one task (its loss weight 0, nothing else changed) and compare every remaining
task's metric with the full model trained with the same budget and seeds - negative transfer, by outcome.

Columns (:data:`REMOVAL_COLUMNS`): dropped, seed, task, metric, full, without, delta (= without - full) and harm
(delta signed so that positive is worse). :func:`gatewatch.ablation.summaries.removal_summary` gives the mean
and spread over seeds and the sentence ("without marital, income AUC +0.004 (+-0.001): marital hurts income").
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from ..training import TrainConfig, train
from .comparison import _comparison_plan, check_retraining
from .errors import AblationError, AblationStopped
from .evaluation import EvalFn, eval_mode, evaluate_checked, with_harm
from .jobs import Progress, StopFn, Tracking, tick
from .rates import REMOVAL_SEEDS, check_seeds
from .saved_run import load_target, run_and_save

REMOVAL_COLUMNS = ["dropped", "seed", "task", "metric", "full", "without", "delta", "harm"]
Factory = Callable[[int], nn.Module]  # seed -> a fresh, untrained model
TrainFn = Callable[[nn.Module, Mapping[str, float], int], Any]  # (model, loss weight per task, seed): trains it
RunOne = Callable[[dict[str, float], int], dict[str, dict[str, float]]]  # (weights, seed) -> metrics


def check_drop(tasks: Sequence[str], drop: Iterable[str] | None) -> list[str]:
    """The tasks to leave out in turn (every task when ``drop`` is empty or None); AblationError on bad input."""
    tasks = list(tasks)
    if len(tasks) < 2:
        raise AblationError(f"Task removal compares tasks with and without another, but this model has one task "
                            f"{tasks}: there is nothing to remove.")
    chosen = list(dict.fromkeys(drop or tasks))
    if unknown := [t for t in chosen if t not in tasks]:
        raise AblationError(f"Unknown task(s) {unknown} to drop; the run's tasks are {tasks}.")
    return chosen


def _removal(run_one: RunOne, tasks: Sequence[str], drop: list[str], seeds: list[int],
             progress: Progress | None, should_stop: StopFn | None) -> pd.DataFrame:
    """Train the full model and each model without one task at every seed; the rows of REMOVAL_COLUMNS."""
    rows: list[dict[str, Any]] = []
    total, done = len(seeds) * (1 + len(drop)), 0
    for seed in seeds:
        tick(progress, should_stop, done, total, f"full model, seed {seed}")
        full = run_one({t: 1.0 for t in tasks}, seed)
        done += 1
        for dropped in drop:
            tick(progress, should_stop, done, total, f"without {dropped}, seed {seed}")
            without = run_one({t: 0.0 if t == dropped else 1.0 for t in tasks}, seed)
            done += 1
            rows += [{"dropped": dropped, "seed": seed, "task": task, "metric": metric, "full": value,
                      "without": without.get(task, {}).get(metric, math.nan)}
                     for task, values in full.items() if task != dropped for metric, value in values.items()]
    tick(progress, None, done, total, "done")
    df = pd.DataFrame(rows, columns=REMOVAL_COLUMNS[:-2])
    df["delta"] = df["without"] - df["full"]
    return with_harm(df).astype({"seed": "int64"})


def task_removal(factory: Factory, train_fn: TrainFn, evaluate: EvalFn, tasks: Sequence[str], *,
                 drop: Iterable[str] | None = None, seeds: Iterable[int] = REMOVAL_SEEDS,
                 progress: Progress | None = None, should_stop: StopFn | None = None) -> pd.DataFrame:
    """Task removal on your own model: ``factory(seed)`` makes a fresh model, ``train_fn(model, weights, seed)``
    trains it with loss weight ``weights[task]`` per task (0 for the task left out), ``evaluate(model)`` returns
    ``{task: {metric: value}}`` on held-out data. The full model is trained with the same seeds and budget."""
    drop, seeds = check_drop(tasks, drop), check_seeds(seeds)

    def run_one(weights: dict[str, float], seed: int) -> dict[str, dict[str, float]]:
        model = factory(seed)
        train_fn(model, weights, seed)
        with eval_mode(model):
            return evaluate_checked(model, evaluate, f"after training with task weights {weights}")

    return _removal(run_one, tasks, drop, seeds, progress, should_stop)


def run_task_removal(
    run_dir: str | os.PathLike[str], *, drop: Iterable[str] | None = None, seeds: Iterable[int] = REMOVAL_SEEDS,
    steps: int | None = None, split: str = "val", factory: str | None = None, allow_factory: bool = False,
    tracking: Tracking | None = None,
) -> pd.DataFrame:
    """Task removal of a saved run (its model, data and training settings; ``steps`` defaults to the run's own,
    capped at ``TRAIN_STEPS``), written to ``RUN/ablations/task_removal.parquet``. The short runs are trained in
    a temporary folder and not kept."""
    seeds = check_seeds(seeds)
    steps = check_retraining(steps, split, "Task removal")
    target = load_target(run_dir, factory=factory, allow_factory=allow_factory, split=split)
    drop = check_drop(target.tasks, drop)
    plan = _comparison_plan(target, steps, factory, allow_factory)
    base = {**plan.config, "tensorboard": False, "conflict_every": None}
    try:
        TrainConfig(**base)
    except (TypeError, ValueError) as err:
        raise AblationError(f"Cannot train this run again: {err}") from err

    def work(progress: Progress, should_stop: StopFn) -> pd.DataFrame:
        with tempfile.TemporaryDirectory(prefix="gatewatch-task-removal-") as root:
            def run_one(weights: dict[str, float], seed: int) -> dict[str, dict[str, float]]:
                folder = Path(root) / f"seed-{seed}-{'-'.join(t for t, w in weights.items() if not w) or 'full'}"
                config = TrainConfig(**{**base, "task_weights": weights, "seed": seed})
                train(config, folder, progress=False, should_stop=should_stop, model_builder=plan.builder)
                if should_stop():
                    raise AblationStopped(f"stopped while training {folder.name}")
                metrics = json.loads((folder / "metrics.json").read_text())[split]
                shutil.rmtree(folder, ignore_errors=True)
                return metrics

            return _removal(run_one, target.tasks, drop, seeds, progress, should_stop)

    return run_and_save(target, "task_removal", tracking, work, drop=drop, seeds=seeds, steps=base["steps"])
