"""The router scalars TensorBoard and the trackers chart, bounded however many layers and experts a model has.

Per router (layer) and window: ``router/<gate>/{max_violation,dead,margin,small_margin,dropped,bias_changed,
bias_max}``; across layers: ``routers/<metric>/{p50,p90,max}``; per layer, the ``TOP_K`` busiest and idlest
experts' loads ``router/<gate>/load/top<i>`` and ``/bottom<i>``. Per-expert tags (``router/<gate>/load/<expert>``
and the gates quantity's ``gate/<gate>/share/<expert>``) are kept only while gates x experts <=
:data:`~gatewatch.declarations.PER_EXPERT_LIMIT`: 48 layers x 128 experts would be 6,144 series. The run
directory keeps everything.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from ...declarations import Add, per_expert_ok

ROUTER_SCALARS = ("max_violation", "dead", "margin", "small_margin", "dropped", "bias_changed", "bias_max")
ACROSS_LAYERS = ("max_violation", "dead", "dropped")
TOP_K = 3


def router_scalars(tables: Mapping[str, pd.DataFrame], add: Add) -> None:
    """Call ``add(tag, value, step)`` for every router scalar of one flush's tables (see the module docstring)."""
    routers = tables.get("routers")
    if routers is None or not len(routers):
        return
    routers = routers[routers["tokens"] > 0]
    for row in routers.itertuples(index=False):
        for metric in ROUTER_SCALARS:
            add(f"router/{row.gate}/{metric}", getattr(row, metric), row.step)
    for step, rows in routers.groupby("step"):
        for metric in ACROSS_LAYERS:
            values = rows[metric].dropna().to_numpy(dtype=float)
            if len(values):
                for name, value in (("p50", np.percentile(values, 50)), ("p90", np.percentile(values, 90)),
                                    ("max", values.max())):
                    add(f"routers/{metric}/{name}", value, step)
    experts = tables.get("router_experts")
    if experts is None or not len(experts):
        return
    for (gate, step), rows in experts.dropna(subset=["load"]).groupby(["gate", "step"], sort=False):
        load = np.sort(rows["load"].to_numpy(dtype=float))
        for i in range(min(TOP_K, len(load))):
            add(f"router/{gate}/load/top{i + 1}", load[-1 - i], step)
            add(f"router/{gate}/load/bottom{i + 1}", load[i], step)
        if per_expert_ok(tables):
            for row in rows.itertuples(index=False):
                add(f"router/{gate}/load/{row.expert_name}", row.load, step)


__all__ = ["ROUTER_SCALARS", "TOP_K", "router_scalars"]
