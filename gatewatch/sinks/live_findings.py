"""The findings of the recent windows while training, for the sinks that chart them (trackers): the finding rules
and the report of the quantities' read halves over the last ``RECENT_WINDOWS`` windows, at a bounded cost."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from ..findings import find
from ..liveness import run_status
from ..loaded_run import Run
from ..report import build_report

RECENT_WINDOWS = 100  # windows of history kept in memory for the finding rules (only when a sink asks for them)
# The rules run at a flush only when the time since they last ran is at least this many times what they took
# then, so they never take more than 1 / FINDINGS_COST_RATIO of the training time (benchmarks/bench_capture.py).
FINDINGS_COST_RATIO = 500


class RecentWindows:
    """The tables of the last ``RECENT_WINDOWS`` windows, as a :class:`~gatewatch.loaded_run.Run` for the rules."""

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
        names = {name for t in self.flushes for name in t}
        tables = {name: pd.concat([t[name] for t in self.flushes if name in t], ignore_index=True) for name in names}
        return Run.of_tables(path, dict(meta), tables, status=run_status(meta, path))

    def due(self) -> bool:
        """Whether the rules may run now: at most ``1 / cost_ratio`` of the time goes to them."""
        return self.ran_at is None or time.monotonic() - self.ran_at >= self.cost_ratio * self.took

    def findings(self, path: Path, meta: dict[str, Any], *, force: bool = False) -> list[dict[str, Any]] | None:
        """The findings of the recent windows (the pure rules of the quantities' read halves), or None when they
        are not :meth:`due` yet (unless ``force``), or (with one warning) when a rule fails: a rule never stops
        training."""
        if not (force or self.due()):
            return None
        start = time.monotonic()
        out = self._guarded(lambda: [f.to_dict() for f in find(self.run(path, meta))])
        self.ran_at, self.took = time.monotonic(), time.monotonic() - start
        return out

    def report(self, path: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
        """The report of the recent windows (same keys as ``gatewatch report --json``); None when it fails."""
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
