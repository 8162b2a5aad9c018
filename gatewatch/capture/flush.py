"""What a flush makes of the quantities' rows: one DataFrame per table, and the NaN/Inf policy."""

from __future__ import annotations

import warnings

import pandas as pd

from ..gating.specs import NonFiniteGateError
from ..schema import TABLES, conform, frame
from .quantity import Rows

ON_NONFINITE = ("warn", "ignore", "raise")
NONFINITE_EVENTS = ("nonfinite", "nonfinite_loss")


def merge(parts: list[Rows]) -> dict[str, pd.DataFrame]:
    """One DataFrame per table (every table present, possibly empty) from the rows of all quantities."""
    pieces: dict[str, list[pd.DataFrame]] = {name: [] for name in TABLES}
    for rows in parts:
        for name, value in rows.items():
            df = value if isinstance(value, pd.DataFrame) else frame(name, value)
            if len(df):
                pieces[name].append(df)
    return {name: conform(name, pd.concat(dfs, ignore_index=True)) if dfs else frame(name)
            for name, dfs in pieces.items()}


def nonfinite_message(events: pd.DataFrame) -> str | None:
    """What the NaN/Inf first seen in this flush's ``events`` are, in words (None: there is none)."""
    bad = events[events["kind"].isin(NONFINITE_EVENTS)] if len(events) else events
    return "; ".join(m.rstrip(".") for m in bad["message"].astype(str)) + "." if len(bad) else None


def check_nonfinite(events: pd.DataFrame, policy: str) -> None:
    """Warn about (or stop on, with ``policy="raise"``) the NaN/Inf first seen in this flush."""
    text = nonfinite_message(events)
    if text is None or policy == "ignore":
        return
    if policy == "raise":
        raise NonFiniteGateError(f"gatewatch stops training (on_nonfinite='raise'): {text}")
    warnings.warn(f"gatewatch: {text}", RuntimeWarning, stacklevel=4)
