"""What a flush makes of the quantities' rows: one DataFrame per table, the NaN/Inf policy, and the recent
windows the finding rules look at while training."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from ..gates import NonFiniteGateError
from ..liveness import run_status
from ..run import Run
from ..schema import TABLES, conform, frame
from .quantity import Rows

ON_NONFINITE = ("warn", "ignore", "raise")
NONFINITE_EVENTS = ("nonfinite", "nonfinite_loss")
RECENT_WINDOWS = 100  # windows of history kept in memory for the finding rules (only when a sink asks for them)
# The rules run at a flush only when the time since they last ran is at least this many times what they took
# then, so they never take more than 1 / FINDINGS_COST_RATIO of the training time (benchmarks/bench_capture.py).
FINDINGS_COST_RATIO = 500


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


def check_nonfinite(events: pd.DataFrame, policy: str) -> None:
    """Warn about (or stop on, with ``policy="raise"``) the NaN/Inf first seen in this flush."""
    bad = events[events["kind"].isin(NONFINITE_EVENTS)] if len(events) else events
    if not len(bad) or policy == "ignore":
        return
    text = "; ".join(m.rstrip(".") for m in bad["message"].astype(str)) + "."
    if policy == "raise":
        raise NonFiniteGateError(f"gatewatch stops training (on_nonfinite='raise'): {text}")
    warnings.warn(f"gatewatch: {text}", RuntimeWarning, stacklevel=4)


class RecentWindows:
    """The tables of the last ``RECENT_WINDOWS`` windows, as a :class:`~gatewatch.run.Run` for the finding rules."""

    def __init__(self, windows: int = RECENT_WINDOWS, cost_ratio: float = FINDINGS_COST_RATIO) -> None:
        self.windows = windows
        self.cost_ratio = cost_ratio
        self.flushes: list[dict[str, pd.DataFrame]] = []
        self.failed = False
        self.ran_at: float | None = None  # time.monotonic() when the rules last ran
        self.took = 0.0  # seconds they took then

    def add(self, tables: dict[str, pd.DataFrame]) -> None:
        self.flushes.append(tables)
        while len(self.flushes) > 1 and self._windows(self.flushes[1:]) >= self.windows:
            self.flushes.pop(0)

    @staticmethod
    def _windows(flushes: list[dict[str, pd.DataFrame]]) -> int:
        return sum(int(t["gates"]["step"].nunique()) for t in flushes if "gates" in t)

    def run(self, path: Path, meta: dict[str, Any]) -> Run:
        tables = {name: conform(name, pd.concat([t[name] for t in self.flushes if name in t], ignore_index=True))
                  if self.flushes else frame(name) for name in TABLES}
        return Run(path=path, meta=dict(meta), tables=tables, status=run_status(meta, path))

    def due(self) -> bool:
        """Whether the rules may run now: at most ``1 / cost_ratio`` of the time goes to them."""
        return self.ran_at is None or time.monotonic() - self.ran_at >= self.cost_ratio * self.took

    def findings(self, path: Path, meta: dict[str, Any], *, force: bool = False) -> list[dict[str, Any]] | None:
        """The findings of the recent windows (the pure rules of the quantities' read halves), or None when they
        are not :meth:`due` yet (unless ``force``), or (with one warning) when a rule fails: a rule never stops
        training."""
        from ..findings import find

        if not (force or self.due()):
            return None
        start = time.monotonic()
        out = self._guarded(lambda: [f.to_dict() for f in find(self.run(path, meta))])
        self.ran_at, self.took = time.monotonic(), time.monotonic() - start
        return out

    def report(self, path: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
        """The report of the recent windows (same keys as ``gatewatch report --json``); None when it fails."""
        from ..report import build_report

        return self._guarded(lambda: build_report(self.run(path, meta)))

    def _guarded(self, make: Any) -> Any:
        try:
            return make()
        except Exception as err:
            if not self.failed:
                warnings.warn(f"gatewatch could not evaluate the findings of the recent windows ({type(err).__name__}: "
                              f"{err}); the trackers get none this time.", RuntimeWarning, stacklevel=4)
            self.failed = True
            return None
