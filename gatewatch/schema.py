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
}


def frame(table: str, rows: Iterable[Mapping[str, Any]] | None = None) -> pd.DataFrame:
    """A DataFrame of ``table``'s columns and types (empty when ``rows`` is None)."""
    columns = TABLES[table]
    df = pd.DataFrame(list(rows or []), columns=list(columns))
    return conform(table, df)


def conform(table: str, df: pd.DataFrame) -> pd.DataFrame:
    """Cast ``df`` to ``table``'s schema: add missing columns as nulls, drop unknown ones, fix types."""
    columns = TABLES[table]
    out = pd.DataFrame(index=df.index)
    for col, dtype in columns.items():
        values = df[col] if col in df.columns else pd.Series([None] * len(df), index=df.index, dtype="object")
        if dtype == "int64" and values.isna().any():
            dtype = "Int64"
        out[col] = values.astype(dtype)
    return out.reset_index(drop=True)
