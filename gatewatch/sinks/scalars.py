"""Which scalars of a flush's tables a tracker charts: one choice shared by TensorBoard, MLflow and W&B.

Tags are hierarchical so the trackers group them: ``gate/<gate>/<metric>``, ``gate/<gate>/share/<expert>`` (while
gates x experts <= 256), sparse routers' ``router/...`` and ``routers/...`` (:mod:`.router_scalars`),
``expert/<expert>/utilization``, ``experts/load_cv``, ``loss/<task>``, ``eval/<split>/<task>/<metric>``;
task conflict ``conflict/<a>~<b>/{cosine,sign_conflict,magnitude_sim}`` over all shared parameters,
``conflict/<a>~<b>/module/<module>/cosine``, ``conflict/norm/<task>`` and the proxy's
``conflict_proxy/<a>~<b>/module/<module>/cosine``. Rows per shared tensor, histograms
and events stay in the run directory (TensorBoard also draws the histograms).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from ..stats import load_cv
from .router_scalars import per_expert_ok, router_scalars

GATE_SCALARS = ("entropy", "entropy_of_mean", "mutual_info", "effective_experts", "polarization",
                "max_weight", "top_share", "spread", "drift")
CONFLICT_SCALARS = ("cosine", "sign_conflict", "magnitude_sim")
WINDOW_TABLES = ("gates", "shares", "hist", "experts", "losses", "routers", "router_experts")  # one row set per
# statistics window

Scalar = tuple[str, float, int]  # (tag, value, step)


def scalars(tables: dict[str, pd.DataFrame]) -> list[Scalar]:
    """The ``(tag, value, step)`` scalars of one flush's tables, in table order; missing and NaN values are left
    out (a window without a value has no point, as in TensorBoard)."""
    out: list[Scalar] = []

    def add(tag: str, value: Any, step: Any) -> None:
        if value is None or pd.isna(value):
            return
        out.append((tag, float(value), int(step)))

    for row in _rows(tables, "gates"):
        for metric in GATE_SCALARS:
            add(f"gate/{row.gate}/{metric}", getattr(row, metric), row.step)
    per_expert = per_expert_ok(tables)
    for row in _rows(tables, "shares") if per_expert else ():
        add(f"gate/{row.gate}/share/{row.expert_name}", row.share, row.step)
    router_scalars(tables, add, per_expert)  # per layer, percentiles across layers, top/bottom experts
    experts = tables.get("experts")
    for row in _rows(tables, "experts"):
        add(f"expert/{row.expert}/utilization", row.utilization, row.step)
    if experts is not None and len(experts):
        for step, util in experts.groupby("step")["utilization"]:
            cv = load_cv(util)
            add("experts/load_cv", math.nan if cv is None else cv, step)
    for row in _rows(tables, "losses"):
        add(f"loss/{row.task}", row.loss, row.step)
    for row in _rows(tables, "eval"):
        add(f"eval/{row.split}/{row.task}/{row.metric}", row.value, row.step)
    for row in _rows(tables, "conflict"):
        pair = f"{row.task_a}~{row.task_b}"
        if row.scope == "all":
            for metric in CONFLICT_SCALARS:
                add(f"conflict/{pair}/{metric}", getattr(row, metric), row.step)
            add(f"conflict/norm/{row.task_a}", row.norm_a, row.step)
            add(f"conflict/norm/{row.task_b}", row.norm_b, row.step)
        elif row.scope == "module":
            add(f"conflict/{pair}/module/{row.name}/cosine", row.cosine, row.step)
    for row in _rows(tables, "conflict_proxy"):  # the conflict proxy, every step: labelled as such
        add(f"conflict_proxy/{row.task_a}~{row.task_b}/module/{row.name}/cosine", row.cosine, row.step)
    return out


def _rows(tables: dict[str, pd.DataFrame], name: str) -> Any:
    df = tables.get(name)
    return () if df is None or not len(df) else df.itertuples(index=False)


__all__ = ["CONFLICT_SCALARS", "GATE_SCALARS", "WINDOW_TABLES", "Scalar", "scalars"]
