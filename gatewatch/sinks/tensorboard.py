"""TensorBoard event files, written at flush time only.

Tags are hierarchical so TensorBoard groups them: ``gate/<gate>/<metric>``,
``gate/<gate>/share/<expert>``, ``expert/<expert>/utilization``, ``experts/load_cv``,
``loss/<task>``; task conflict ``conflict/<a>~<b>/{cosine,sign_conflict,magnitude_sim}`` over all shared
parameters, ``conflict/<a>~<b>/module/<module>/cosine``, ``conflict/norm/<task>``; histograms
``gate/<gate>/weights`` and ``conflict/purity`` (GradDrop sign purity) from precomputed counts. Rows per
shared tensor stay in the run directory only.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

GATE_SCALARS = ("entropy", "entropy_of_mean", "mutual_info", "effective_experts", "polarization",
                "max_weight", "top_share", "spread", "drift")
CONFLICT_SCALARS = ("cosine", "sign_conflict", "magnitude_sim")


class TensorBoardSink:
    """Writes the rows of each flush as TensorBoard scalars and histograms.

    A failure to write is reported once (a warning); the writer is dropped and opened afresh (a new
    event file) at the next flush, which writes the flushes kept since (at most ``max_pending``). The
    same happens when the folder was removed while the run goes on. It never raises into training.
    """

    def __init__(self, log_dir: str | os.PathLike[str], *, max_pending: int = 32) -> None:
        self.path = Path(log_dir)
        self.max_pending = max_pending
        self.pending: list[dict[str, pd.DataFrame]] = []
        self.failing = False
        self.writer: Any = self._open()

    def _open(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.path))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            self.writer.add_scalar(tag, float(value), int(step))

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

    def _write(self, tables: dict[str, pd.DataFrame]) -> None:
        for row in tables.get("gates", pd.DataFrame()).itertuples(index=False):
            for metric in GATE_SCALARS:
                self.scalar(f"gate/{row.gate}/{metric}", getattr(row, metric), row.step)
        for row in tables.get("shares", pd.DataFrame()).itertuples(index=False):
            self.scalar(f"gate/{row.gate}/share/{row.expert_name}", row.share, row.step)
        experts = tables.get("experts", pd.DataFrame())
        for row in experts.itertuples(index=False):
            self.scalar(f"expert/{row.expert}/utilization", row.utilization, row.step)
        for step, util in experts.groupby("step")["utilization"] if len(experts) else []:
            mean = util.mean()
            self.scalar("experts/load_cv", float(util.std(ddof=0) / mean) if mean > 0 else math.nan, step)
        for row in tables.get("losses", pd.DataFrame()).itertuples(index=False):
            self.scalar(f"loss/{row.task}", row.loss, row.step)
        hist = tables.get("hist", pd.DataFrame())
        for (step, gate), h in hist.groupby(["step", "gate"]) if len(hist) else []:
            self._histogram(f"gate/{gate}/weights", h, int(step))
        self._conflict(tables)

    def _conflict(self, tables: dict[str, pd.DataFrame]) -> None:
        """Task conflict: per pair over all shared parameters and per module; purity over all of them."""
        for row in tables.get("conflict", pd.DataFrame()).itertuples(index=False):
            pair = f"{row.task_a}~{row.task_b}"
            if row.scope == "all":
                for metric in CONFLICT_SCALARS:
                    self.scalar(f"conflict/{pair}/{metric}", getattr(row, metric), row.step)
                self.scalar(f"conflict/norm/{row.task_a}", row.norm_a, row.step)
                self.scalar(f"conflict/norm/{row.task_b}", row.norm_b, row.step)
            elif row.scope == "module":
                self.scalar(f"conflict/{pair}/module/{row.name}/cosine", row.cosine, row.step)
        purity = tables.get("purity", pd.DataFrame())
        purity = purity[purity["scope"] == "all"] if len(purity) else purity
        for step, h in purity.groupby("step") if len(purity) else []:
            self._histogram("conflict/purity", h, int(step))

    def _histogram(self, tag: str, h: pd.DataFrame, step: int) -> None:
        counts = h["count"].to_numpy()
        total = counts.sum()
        if total <= 0:
            return
        centers = (h["lo"].to_numpy() + h["hi"].to_numpy()) / 2
        self.writer.add_histogram_raw(
            tag, min=float(h["lo"].min()), max=float(h["hi"].max()), num=float(total),
            sum=float((centers * counts).sum()), sum_squares=float((centers**2 * counts).sum()),
            bucket_limits=h["hi"].tolist(), bucket_counts=counts.tolist(), global_step=step,
        )

    def close(self) -> None:
        """Flush and close the event file (never raises)."""
        self._drop_writer()
