"""Gate-dropout sweep: evaluate with random per-sample gate dropout at several rates and seeds.

Columns (:data:`SWEEP_COLUMNS`): rate, seed, task, metric, value, base (rate 0), delta, harm.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd
from torch import nn

from ..masking import GateSpecs, gate_dropout, resolve_gates
from .evaluation import EvalFn, eval_mode, evaluate_checked, with_harm
from .jobs import Progress, StopFn, Tracking, tick
from .rates import DEFAULT_RATES, DEFAULT_SEEDS, check_rates, check_seeds
from .saved_run import load_target, run_and_save

SWEEP_COLUMNS = ["rate", "seed", "task", "metric", "value", "base", "delta", "harm"]


def dropout_sweep(
    model: nn.Module,
    evaluate: EvalFn,
    *,
    rates: Iterable[float] = DEFAULT_RATES,
    seeds: Iterable[int] = DEFAULT_SEEDS,
    gates: GateSpecs = None,
    tasks: Sequence[str] | None = None,
    progress: Progress | None = None,
    should_stop: StopFn | None = None,
) -> pd.DataFrame:
    """Evaluate with random per-sample gate dropout on every gate at each rate and seed.

    Rate 0 is the unmasked model (evaluated once). Each (rate, seed) draws its masks from a generator
    seeded with ``seed``, so at one seed an expert dropped at rate r is also dropped at every higher rate
    (common random numbers, apart from rows that lost every expert): the curves are smooth in the rate.
    """
    rates, seeds = check_rates(rates), check_seeds(seeds)
    resolved = resolve_gates(model, tasks, gates)
    with eval_mode(model):
        base = evaluate_checked(model, evaluate, "")
        total = sum(r > 0 for r in rates) * len(seeds)
        rows: list[dict[str, Any]] = []
        done = 0
        for rate in rates:
            for seed in seeds:
                if rate == 0:
                    values = base
                else:
                    tick(progress, should_stop, done, total, f"gate dropout {rate:g}, seed {seed}")
                    with gate_dropout(model, rate, gates=resolved, seed=seed):
                        values = evaluate_checked(model, evaluate, f"at gate dropout {rate:g}")
                    done += 1
                rows += [{"rate": rate, "seed": seed, "task": task, "metric": metric,
                          "value": values.get(task, {}).get(metric, math.nan), "base": b}
                         for task, vals in base.items() for metric, b in vals.items()]
        tick(progress, None, done, total, "done")
    df = pd.DataFrame(rows, columns=SWEEP_COLUMNS[:-2])
    df["delta"] = df["value"] - df["base"]
    return with_harm(df).astype({"seed": "int64"})


def run_dropout_sweep(
    run_dir: str | os.PathLike[str], *, rates: Iterable[float] = DEFAULT_RATES, seeds: Iterable[int] = DEFAULT_SEEDS,
    factory: str | None = None, allow_factory: bool = False, split: str = "val", tracking: Tracking | None = None,
) -> pd.DataFrame:
    """Gate-dropout sweep of a saved run, written to ``RUN/ablations/dropout_sweep.parquet``."""
    rates, seeds = check_rates(rates), check_seeds(seeds)
    target = load_target(run_dir, factory=factory, allow_factory=allow_factory, split=split)
    return run_and_save(target, "dropout_sweep", tracking, lambda progress, should_stop: dropout_sweep(
        target.model, target.evaluate, rates=rates, seeds=seeds, gates=target.gates, progress=progress,
        should_stop=should_stop), rates=rates, seeds=seeds)
