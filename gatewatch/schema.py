"""The tidy tables of a run directory: one place that names every column and its type.

Writers build DataFrames with :func:`frame`; :func:`~gatewatch.runs.load_run` returns these columns,
in this order, even for a table that has no rows yet. ``step`` is always the last training step of
the window (or the step of the measurement) the row describes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

RUN_FORMAT = "gatewatch-run/1"

TABLES: dict[str, dict[str, str]] = {
    # one row per gate per window
    "gates": {
        "step": "int64", "gate": "string", "task": "string", "level": "int64", "experts": "int64",
        "samples": "float64", "entropy": "float64", "entropy_of_mean": "float64", "mutual_info": "float64",
        "effective_experts": "float64", "polarization": "float64", "max_weight": "float64",
        "top_share": "float64", "spread": "float64", "drift": "float64", "small_margin": "float64",
        "nonfinite": "float64", "first_nonfinite_step": "Int64",
    },
    # one row per gate per expert per window
    "shares": {
        "step": "int64", "gate": "string", "expert": "int64", "expert_name": "string", "share": "float64",
        "std": "float64", "top1": "float64", "selected": "float64",
    },
    # gate-weight histogram: one row per gate per bin per window
    "hist": {"step": "int64", "gate": "string", "bin": "int64", "lo": "float64", "hi": "float64", "count": "float64"},
    # one row per expert label per window, averaged over the gates that mix that expert
    "experts": {"step": "int64", "expert": "string", "utilization": "float64", "reference": "float64",
                "selected": "float64", "gates": "int64"},
    # mean task loss per window (from watch.backward / watch.log_losses)
    "losses": {"step": "int64", "task": "string", "loss": "float64"},
    # things that happened: non-finite gates, logging failures, evaluations
    "events": {"step": "int64", "kind": "string", "source": "string", "message": "string"},
    # gradient conflict (GateWatch(conflict_every=...)): one row per conflict step x scope x name x task pair;
    # scope "param" (one shared tensor), "module" (a group of them), "all" (every shared parameter, name "all").
    # zero_grad: a task has no gradient there (cosine and magnitude_sim are then 0); below: measured steps so
    # far whose cosine fell below conflict_threshold (Recon); elements: the number of parameter elements
    "conflict": {
        "step": "int64", "scope": "string", "name": "string", "task_a": "string", "task_b": "string",
        "cosine": "float64", "sign_conflict": "float64", "norm_a": "float64", "norm_b": "float64",
        "magnitude_sim": "float64", "below": "int64", "zero_grad": "bool", "elements": "int64",
    },
    # GradDrop sign purity P = (1 + sum_k g_k / sum_k |g_k|) / 2 over all tasks: element counts per bin of [0, 1]
    # per conflict step x scope ("module" | "all") x name; elements no task touches are left out
    "purity": {"step": "int64", "scope": "string", "name": "string", "bin": "int64", "lo": "float64",
               "hi": "float64", "count": "float64"},
    # held-out evaluations (gatewatch.training): one row per split per task per metric
    "eval": {"step": "int64", "split": "string", "task": "string", "metric": "string", "value": "float64"},
}


def frame(table: str, rows: Iterable[Mapping[str, Any]] | None = None) -> pd.DataFrame:
    """A DataFrame of ``table``'s columns and types (empty when ``rows`` is None)."""
    columns = TABLES[table]
    df = pd.DataFrame(list(rows or []), columns=list(columns))
    return conform(table, df)


def conform(table: str, df: pd.DataFrame) -> pd.DataFrame:
    """Cast ``df`` to ``table``'s schema: add missing columns as nulls, drop unknown ones, fix types."""
    columns = TABLES[table]
    data = {}
    for col, dtype in columns.items():
        values = df[col] if col in df.columns else pd.Series([None] * len(df), index=df.index, dtype="object")
        if dtype == "int64" and values.isna().any():
            dtype = "Int64"
        data[col] = values.astype(dtype)
    return pd.DataFrame(data, index=df.index).reset_index(drop=True)  # built at once: column inserts are slow
