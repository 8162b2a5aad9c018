"""Which scalars of a flush's tables a tracker charts: one choice shared by TensorBoard, MLflow and W&B.

Each registered quantity declares its own (``ReadHalf.scalars``, :mod:`gatewatch.declarations`); this module
adds the core ``eval`` table's and calls them all. Tags are hierarchical so the trackers group them:
``gate/<gate>/<metric>``, ``gate/<gate>/share/<expert>`` (while gates x experts <= 256), sparse routers'
``router/...`` and ``routers/...`` (:mod:`gatewatch.quantities.routers.scalars`), ``expert/<expert>/utilization``,
``experts/load_cv``, ``loss/<task>``, ``eval/<split>/<task>/<metric>``; task conflict
``conflict/<a>~<b>/{cosine,sign_conflict,magnitude_sim}`` over all shared parameters,
``conflict/<a>~<b>/module/<module>/cosine``, ``conflict/norm/<task>`` and the proxy's
``conflict_proxy/<a>~<b>/module/<module>/cosine``. Rows per shared tensor, histograms
and events stay in the run directory (TensorBoard also draws the histograms).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from ..declarations import table_rows
from ..registry import declarations

Scalar = tuple[str, float, int]  # (tag, value, step)


def window_tables() -> set[str]:
    """The tables with one row set per statistics window, of every registered quantity (TensorBoard thins them)."""
    return {table for _, half in declarations() for table in half.windowed}


def eval_scalars(tables: Mapping[str, pd.DataFrame], add: Any) -> None:
    """``eval/<split>/<task>/<metric>`` of the core ``eval`` table."""
    for row in table_rows(tables, "eval"):
        add(f"eval/{row.split}/{row.task}/{row.metric}", row.value, row.step)


def scalars(tables: Mapping[str, pd.DataFrame]) -> list[Scalar]:
    """The ``(tag, value, step)`` scalars of one flush's tables, quantity by quantity in registration order, then
    ``eval``; missing and NaN values are left out (a window without a value has no point, as in TensorBoard)."""
    out: list[Scalar] = []

    def add(tag: str, value: Any, step: Any) -> None:
        if value is None or pd.isna(value):
            return
        out.append((tag, float(value), int(step)))

    for _, half in declarations():
        if half.scalars is not None:
            half.scalars(tables, add)
    eval_scalars(tables, add)
    return out


__all__ = ["Scalar", "eval_scalars", "scalars", "window_tables"]
