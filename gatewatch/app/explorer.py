"""The Runs page's explorer without Streamlit: filter the table of run rows (:func:`gatewatch.app.state.summary_row`)
by name, status, severity, finding code and config values, and sort it by any column."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import pandas as pd

from ..rules import SEVERITY_ORDER
from .state import CONFIG_PREFIX

SEVERITIES = ("error", "warning", "info", "healthy", "unknown")


def config_columns(table: pd.DataFrame) -> list[str]:
    """The config columns of the table, e.g. ``"config: lr"``."""
    return [c for c in table.columns if str(c).startswith(CONFIG_PREFIX)]


def config_values(table: pd.DataFrame, column: str) -> list[str]:
    """The distinct values of a config column, as the text the filter shows (missing values left out)."""
    values = table[column].dropna() if column in table else pd.Series(dtype=object)
    return sorted({str(v) for v in values}, key=lambda v: (_as_number(v) is None, _as_number(v) or 0.0, v))


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def filter_runs(table: pd.DataFrame, *, search: str = "", statuses: Collection[str] = (),
                severities: Collection[str] = (), codes: Collection[str] = (),
                config: Mapping[str, Collection[str]] | None = None) -> pd.DataFrame:
    """The rows whose run name contains ``search`` (case-insensitive; words separated by spaces must all appear),
    whose status / worst severity is one of those given, that have any of the finding ``codes``, and whose config
    column ``c`` has one of ``config[c]`` (as text). An empty filter keeps every row."""
    keep = pd.Series(True, index=table.index)
    for word in search.lower().split():
        keep &= table["run"].astype(str).str.lower().str.contains(word, regex=False)
    if statuses:
        keep &= table["status"].isin(list(statuses))
    if severities:
        keep &= table["severity"].isin(list(severities))
    if codes:
        wanted = set(codes)
        keep &= table["codes"].map(lambda have: bool(wanted & set(have)))
    for column, values in (config or {}).items():
        if values:
            texts = {str(v) for v in values}
            keep &= table[column].map(lambda v, t=texts: v is not None and not pd.isna(v) and str(v) in t) \
                if column in table else False
    return table[keep]


def sort_runs(table: pd.DataFrame, column: str, *, descending: bool = False) -> pd.DataFrame:
    """The table sorted by ``column`` (severity from error to healthy; lists by their text; missing values last)."""
    if column not in table:
        raise ValueError(f"cannot sort by {column!r}: the columns are {list(table.columns)}.")
    if column == "severity":
        key = table[column].map(lambda s: SEVERITY_ORDER.get(s, len(SEVERITY_ORDER) + SEVERITIES.index(s)
                                                             if s in SEVERITIES else 9))
    else:
        key = table[column].map(lambda v: ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
        texts = key.map(lambda v: isinstance(v, str))
        if texts.any() and not (texts | key.isna()).all():  # mixed values: compare them as text
            key = key.map(lambda v: None if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v))
    order = key.sort_values(ascending=not descending, na_position="last", kind="stable").index
    return table.loc[order]
