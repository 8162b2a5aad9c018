"""TensorBoard event files, written at flush time only.

Tags are hierarchical so TensorBoard groups them: ``gate/<gate>/<metric>``,
``gate/<gate>/share/<expert>``, ``expert/<expert>/utilization``, ``experts/load_cv``,
``loss/<task>``, ``conflict/...``; histograms ``gate/<gate>/weights`` from precomputed counts.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import pandas as pd

GATE_SCALARS = ("entropy", "entropy_of_mean", "mutual_info", "effective_experts", "polarization",
                "max_weight", "top_share", "spread", "drift")


class TensorBoardSink:
    """Writes the rows of each flush as TensorBoard scalars and histograms."""

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.path))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            self.writer.add_scalar(tag, float(value), int(step))

    def write(self, tables: dict[str, pd.DataFrame]) -> None:
        try:
            self._write(tables)
            self.writer.flush()
        except Exception as err:  # logging must never break training
            warnings.warn(f"gatewatch could not write TensorBoard events in {self.path}: {err}",
                          RuntimeWarning, stacklevel=2)

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
        for row in tables.get("conflict", pd.DataFrame()).itertuples(index=False):
            if getattr(row, "scope", "all") == "all":
                pair = f"{row.task_a}~{row.task_b}"
                self.scalar(f"conflict/{pair}/cosine", row.cosine, row.step)
                self.scalar(f"conflict/{pair}/sign_conflict", row.sign_conflict, row.step)

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
        self.writer.close()
