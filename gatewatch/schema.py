"""The tidy tables of a run directory: every column and its type, gathered from the registered quantities.

Writers build DataFrames with :func:`frame`; :func:`~gatewatch.run_reader.load_run` returns these columns,
in this order, even for a table that has no rows yet. ``step`` is always the last training step of
the window (or the step of the measurement) the row describes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

import pandas as pd

from .registry import Gathered

RUN_FORMAT = "gatewatch-run/1"

BASE_TABLES: dict[str, dict[str, str]] = {
    # things that happened: non-finite gates, logging failures, evaluations
    "events": {"step": "int64", "kind": "string", "source": "string", "message": "string"},
    # held-out evaluations (watch.log_metrics, gatewatch.training): one row per split per task per metric
    "eval": {"step": "int64", "split": "string", "task": "string", "metric": "string", "value": "float64"},
}

# Every table: those of the registered quantities (their read halves name and explain the columns), then the base.
TABLES: Mapping[str, dict[str, str]] = Gathered("tables", last=BASE_TABLES)


def frame(table: str, rows: Iterable[Mapping[str, Any]] | None = None) -> pd.DataFrame:
    """A DataFrame of ``table``'s columns and types (empty when ``rows`` is None or empty)."""
    rows = list(rows or [])
    if not rows:
        # A new frame from cached empty columns: a copy of one cached frame would share its index, and pandas
        # keeps a reference to every view of a shared index until it next prunes them (heap that grows per flush).
        return pd.DataFrame(_empty_columns(table, tuple(TABLES[table].items())), index=pd.RangeIndex(0), copy=False)
    return conform(table, pd.DataFrame(rows, columns=list(TABLES[table])))


@lru_cache(maxsize=64)
def _empty_columns(table: str, columns: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    return {column: pd.array([], dtype=dtype) for column, dtype in columns}


def conform(table: str, df: pd.DataFrame) -> pd.DataFrame:
    """Cast ``df`` to ``table``'s schema: add missing columns as nulls, drop unknown ones, fix types. A frame that
    already has the schema's columns, in order and of their types, on a 0..n-1 index is returned as a shallow copy
    (pandas copies on write: the result is independent all the same)."""
    columns = TABLES[table]
    if _conforms(df, columns):
        return df.copy(deep=False)
    data = {}
    for col, dtype in columns.items():
        values = df[col] if col in df.columns else pd.Series([None] * len(df), index=df.index, dtype="object")
        if values.dtype == dtype:  # already right (the writers build most columns so): no copy
            data[col] = values
            continue
        if dtype == "int64" and values.isna().any():
            dtype = "Int64"
        data[col] = values.astype(dtype)
    return pd.DataFrame(data, index=df.index).reset_index(drop=True)  # built at once: column inserts are slow


def _conforms(df: pd.DataFrame, columns: Mapping[str, str]) -> bool:
    index = df.index
    if list(df.columns) != list(columns) or not (isinstance(index, pd.RangeIndex) and index.start == 0
                                                 and index.step == 1):
        return False
    # an int64 column holding nulls is Int64, as the cast below makes it
    return all(have == want or (want == "int64" and have == "Int64" and df[column].isna().any())
               for (column, want), have in zip(columns.items(), df.dtypes.tolist(), strict=True))
