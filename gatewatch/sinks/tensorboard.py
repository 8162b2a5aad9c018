"""TensorBoard event files, written at flush time only.

Scalars are those of :func:`gatewatch.sinks.scalars.scalars` (the choice the other trackers share, declared by
each quantity): tags ``gate/<gate>/<metric>``, ``gate/<gate>/share/<expert>``, ``router/<gate>/...``,
``expert/<expert>/utilization``, ``experts/load_cv``, ``loss/<task>``, ``eval/<split>/<task>/<metric>``,
``conflict/<a>~<b>/...``, ``conflict/norm/<task>``, ``conflict_proxy/...``. Histograms ``gate/<gate>/weights``
and ``conflict/purity`` (GradDrop sign purity) come from precomputed counts. Rows per shared tensor stay in the run
directory only.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tensorboard.compat.proto.summary_pb2 import Summary

from . import Sink
from .scalars import scalars, window_tables

__all__ = ["TensorBoardSink"]


class TensorBoardSink(Sink):
    """Writes the rows of each flush as TensorBoard scalars and histograms.

    Of the windows of one flush it writes at most ``max_windows``, evenly spaced and the last always
    (statistics every step would otherwise cost more in event writing than in measuring); the run
    directory keeps every window. A failure to write is reported once (a warning); the writer is
    dropped and opened afresh (a new event file) at the next flush, which writes the flushes kept since
    (at most ``max_pending``). The same happens when the folder was removed while the run goes on. It
    never raises into training.
    """

    def __init__(self, log_dir: str | os.PathLike[str], *, max_pending: int = 32, max_windows: int = 10) -> None:
        self.path = Path(log_dir)
        self.max_pending = max_pending
        self.max_windows = max_windows
        self.pending: list[dict[str, pd.DataFrame]] = []
        self.failing = False
        self.writer: Any = self._open()

    def _open(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.path))

    def write(self, tables: dict[str, pd.DataFrame]) -> bool:
        """Write this flush (and the ones kept from failed flushes); False if it failed."""
        self.pending = [*self.pending, tables][-self.max_pending :]
        try:
            if self.writer is None or not self.path.is_dir():
                self._drop_writer()
                self.writer = self._open()
            while self.pending:
                self._write(self.pending[0])
                self.writer.flush()
                self.pending.pop(0)
        except Exception as err:  # logging must never break training
            self._drop_writer()
            if not self.failing:
                warnings.warn(f"gatewatch could not write TensorBoard events in {self.path}: {type(err).__name__}: "
                              f"{err}. Training goes on; it tries again at the next flush.", RuntimeWarning,
                              stacklevel=2)
            self.failing = True
            return False
        if self.failing:
            warnings.warn(f"gatewatch writes TensorBoard events in {self.path} again.", RuntimeWarning, stacklevel=2)
            self.failing = False
        return True

    def _drop_writer(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        self.writer = None

    def _thin(self, tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        """The window tables of one flush (those the quantities declare ``windowed``) cut to at most
        ``max_windows`` windows (evenly spaced, the last kept)."""
        windowed = window_tables()
        steps = sorted(set().union(*(tables[t]["step"].tolist() for t in windowed if t in tables)))
        if len(steps) <= self.max_windows:
            return tables
        stride = -(-len(steps) // self.max_windows)
        keep = set(steps[::-1][::stride])
        return {name: df[df["step"].isin(keep)] if name in windowed else df for name, df in tables.items()}

    def _write(self, tables: dict[str, pd.DataFrame]) -> None:
        tables = self._thin(tables)
        by_step: dict[int, list[tuple[str, float]]] = {}
        for tag, value, step in scalars(tables):
            by_step.setdefault(int(step), []).append((tag, float(value)))
        for step, values in by_step.items():  # one event per step holding all its scalars: far fewer writes
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values])
            self.writer._get_file_writer().add_summary(summary, step)
        hist = tables.get("hist", pd.DataFrame())
        if len(hist):
            self._histograms(hist, hist["gate"].astype(str).to_numpy(), lambda gate: f"gate/{gate}/weights")
        purity = tables.get("purity", pd.DataFrame())
        purity = purity[purity["scope"] == "all"] if len(purity) else purity
        if len(purity):
            self._histograms(purity, np.zeros(len(purity), dtype=np.int64), lambda _: "conflict/purity")

    def _histograms(self, bins: pd.DataFrame, by: np.ndarray, tag: Callable[[Any], str]) -> None:
        """One histogram per (step, ``by``) of the bin rows ``bins`` (``lo``, ``hi``, ``count``), tagged
        ``tag(by)``; read as arrays, not grouped by pandas (a tenth of the time)."""
        steps = bins["step"].to_numpy()
        order = np.lexsort((by, steps))
        steps, by = steps[order], by[order]
        lo, hi, counts = (bins[c].to_numpy(dtype=np.float64)[order] for c in ("lo", "hi", "count"))
        starts = np.flatnonzero(np.r_[True, (steps[1:] != steps[:-1]) | (by[1:] != by[:-1])])
        for start, end in zip(starts, [*starts[1:], len(steps)], strict=True):
            c = counts[start:end]
            total = c.sum()
            if total <= 0:
                continue
            centers = (lo[start:end] + hi[start:end]) / 2
            self.writer.add_histogram_raw(
                tag(by[start]), min=float(lo[start:end].min()), max=float(hi[start:end].max()), num=float(total),
                sum=float((centers * c).sum()), sum_squares=float((centers**2 * c).sum()),
                bucket_limits=hi[start:end].tolist(), bucket_counts=c.tolist(), global_step=int(steps[start]),
            )

    def close(self, report: dict[str, Any] | None = None) -> None:
        """Flush and close the event file (never raises)."""
        self._drop_writer()
