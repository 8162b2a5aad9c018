"""Plain statistics of the tables, shared by the report, the figures and the sinks (numpy and pandas, no torch).

The load coefficient of variation (CV) of experts is defined here and nowhere else: the population standard
deviation of their load (utilization, or the share of tokens routed to each) divided by its mean. 0 means a
perfectly even load; sqrt(E - 1) means one expert of E takes everything. NaN entries are left out (as pandas
does); the CV is undefined (None, or NaN per group) when no value is left, the mean is not positive, or the
result is not finite.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence

import numpy as np
import pandas as pd


def load_cv(values: Iterable[float] | np.ndarray | pd.Series) -> float | None:
    """The load CV of one set of experts: population std / mean of ``values`` (see the module docstring)."""
    x = np.asarray(values if isinstance(values, (np.ndarray, pd.Series)) else list(values), dtype=float).ravel()
    x = x[~np.isnan(x)]
    if not x.size:
        return None
    mean = float(x.mean())
    if not mean > 0 or not math.isfinite(mean):
        return None
    cv = float(x.std(ddof=0)) / mean
    return cv if math.isfinite(cv) else None


def load_cv_by(frame: pd.DataFrame, by: str | Sequence[Hashable], column: str = "utilization") -> pd.Series:
    """:func:`load_cv` of ``frame[column]`` within each group of ``by`` (e.g. per step), computed at once for
    every group; NaN where the CV is undefined."""
    grouped = frame.groupby(by)[column]
    mean = grouped.mean()
    cv = grouped.std(ddof=0) / mean.where(mean > 0)
    return cv.where(np.isfinite(cv))
