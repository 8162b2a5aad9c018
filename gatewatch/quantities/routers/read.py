"""Sparse routers, read half: dispatch tables, the router keys of ``balance[]`` and the router findings.

Pure numpy/pandas. The dispatch view (where tokens went, from the router's own indices or dispatch mask)
is what router collapse, dead experts and imbalance are judged on; the affinity view (the normalised
scores over all experts) is the ``gates`` quantity's, and stays in the ``gates``/``shares`` tables.

* ``load`` of an expert: the share of the window's tokens dispatched to it (adds up to k when nothing is
  dropped); ``max_violation`` (MaxVio, Wang et al. 2024): max load / mean load - 1;
* ``margin``: the mean gap between the k-th and (k+1)-th score in the space the router chose in (scores +
  bias, within the allowed groups), ``small_margin`` the share of tokens whose gap is below the watch's margin;
* ``dropped`` (capacity routers): of the tokens that chose an expert, the share it did not take;
* ``bias``: the expert bias at the window's end; ``bias_changed``: the share of tokens whose chosen set
  differs from the one chosen with the bias at zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ...declarations import Page, ReadHalf, Section
from ...rules import Finding, Thresholds, num, streak_start
from ..gates.read import bare, expert_step, gate_balance, per_expert_at
from .scalars import router_scalars

if TYPE_CHECKING:
    from ...loaded_run import Run

TABLES: dict[str, dict[str, str]] = {
    # one row per router (layer) per window: the dispatch view
    "routers": {
        "step": "int64", "gate": "string", "experts": "int64", "top_k": "int64", "tokens": "float64",
        "max_violation": "float64", "dead": "int64", "margin": "float64", "small_margin": "float64",
        "dropped": "float64", "bias_changed": "float64", "bias_max": "float64",
    },
    # one row per router per expert per window
    "router_experts": {
        "step": "int64", "gate": "string", "expert": "int64", "expert_name": "string", "load": "float64",
        "chose": "float64", "dropped": "float64", "weight": "float64", "bias": "float64",
    },
}


@dataclass(frozen=True)
class Sums:
    """Where each sum lives in a router's window state of ``size`` floats."""

    experts: int

    @property
    def size(self) -> int:
        return 3 * self.experts + 5

    @staticmethod
    def experts_in(size: int) -> int:
        return (size - 5) // 3

    def split(self, s: np.ndarray) -> dict[str, np.ndarray]:
        e = self.experts
        return {"tokens": s[:, 0], "load": s[:, 1:1 + e], "chose": s[:, 1 + e:1 + 2 * e],
                "weight": s[:, 1 + 2 * e:1 + 3 * e], "gap_sum": s[:, 1 + 3 * e], "gap_n": s[:, 2 + 3 * e],
                "gap_small": s[:, 3 + 3 * e], "changed": s[:, 4 + 3 * e]}


def max_violation(load: np.ndarray) -> np.ndarray:
    """MaxVio of loads ``[..., E]``: max / mean - 1 (NaN where nothing was dispatched)."""
    mean = load.mean(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, load.max(-1) / np.where(mean > 0, mean, 1) - 1, np.nan)


def router_tables(gate: str, top_k: int, capacity: bool, steps: np.ndarray, sums: np.ndarray,
                  bias: np.ndarray | None, names: list[str], due: np.ndarray | None = None) -> dict[str, pd.DataFrame]:
    """The ``routers`` rows of one router over the windows ``steps``, and its ``router_experts`` rows in the ``due``
    ones (all when None)."""
    s = np.asarray(sums, dtype=np.float64)
    e = Sums.experts_in(s.shape[1])
    p = Sums(e).split(s)
    w = len(steps)
    tokens = p["tokens"]
    has = tokens > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        load = np.where(has[:, None], p["load"] / np.where(has, tokens, 1)[:, None], np.nan)
        chose = np.where(has[:, None], p["chose"] / np.where(has, tokens, 1)[:, None], np.nan)
        weight = np.where(p["load"] > 0, p["weight"] / np.where(p["load"] > 0, p["load"], 1), np.nan)
        dropped_e = (np.where(p["chose"] > 0, 1 - p["load"] / np.where(p["chose"] > 0, p["chose"], 1), np.nan)
                     if capacity else np.full((w, e), np.nan))
        dropped = (np.where(has, 1 - p["load"].sum(1) / np.where(has, p["chose"].sum(1), 1), np.nan) if capacity
                   else np.full(w, np.nan))
        margin = np.where(p["gap_n"] > 0, p["gap_sum"] / p["gap_n"], np.nan)
        small = np.where(p["gap_n"] > 0, p["gap_small"] / p["gap_n"], np.nan)
    b = np.full((w, e), np.nan) if bias is None else np.asarray(bias, dtype=np.float64)[:w]
    routers = pd.DataFrame({
        "step": steps, "gate": gate, "experts": e, "top_k": top_k, "tokens": tokens,
        "max_violation": max_violation(np.nan_to_num(load)) * np.where(has, 1, np.nan),
        "dead": np.where(has, (p["load"] == 0).sum(1), 0), "margin": margin, "small_margin": small,
        "dropped": dropped, "bias_changed": np.where(has, p["changed"] / np.where(has, tokens, 1), np.nan)
        if bias is not None else np.nan, "bias_max": np.abs(b).max(1) if bias is not None else np.nan,
    })
    due = np.ones(w, dtype=bool) if due is None else np.asarray(due, dtype=bool)
    n = int(due.sum())
    experts = pd.DataFrame({
        "step": np.repeat(steps[due], e), "gate": gate, "expert": np.tile(np.arange(e), n),
        "expert_name": np.tile(np.array(names, dtype=object), n), "load": load[due].ravel(),
        "chose": chose[due].ravel(), "dropped": dropped_e[due].ravel(), "weight": weight[due].ravel(),
        "bias": b[due].ravel(),
    })
    return {"routers": routers, "router_experts": experts}


REMEDY_TEXTS = {
    "router_imbalance": (
        "Balance the layer's load: raise the load-balancing loss coefficient (e.g. 0.001 -> 0.01), or with "
        "aux-loss-free balancing raise the bias update rate u (DeepSeek-V3: 0.001); a capacity factor above 1 "
        "and a router z-loss (1e-3) keep overloaded experts from dropping tokens."
    ),
    "router_collapse": (
        "The router sends almost every token to a few experts. Raise the balancing loss coefficient or the bias "
        "update rate, add a router z-loss (1e-3) so logits stay small, lower the router's learning rate, and "
        "check the router's init (a smaller std spreads tokens at the start)."
    ),
    "router_dead": (
        "No token reaches these experts, so they get no gradient. Raise the balancing loss coefficient or the "
        "bias update rate so the router tries them; a capacity limit on the busy experts pushes tokens over."
    ),
    "router_bias_growing": (
        "The expert bias keeps growing but the load stays imbalanced: the bias update rate is too small to "
        "catch up (raise u), or the scores drift faster than the bias; add a small balancing loss (1e-4) as "
        "DeepSeek-V3 does, or a router z-loss."
    ),
}


def _finding(code: str, severity: str, gate: str, step: int, message: str, value: float | None = None,
             unit: str | None = None) -> Finding:
    return Finding(code, severity, gate, None, int(step), message, REMEDY_TEXTS[code], "routers", None, value, unit)


def router_findings(run: Run, th: Thresholds) -> list[Finding]:
    """Imbalanced layers, collapsed routers, dead experts per layer, and growing bias with imbalance."""
    routers = run.table("routers")
    routers = routers[routers["tokens"] > 0]
    experts = run.table("router_experts")
    out: list[Finding] = []
    for name, g in routers.groupby("gate", sort=False):
        g = g.sort_values("step")
        last = g.iloc[-1]
        recent = g.tail(int(th.router_windows))
        over = recent["max_violation"] > th.router_max_violation
        mine, at = per_expert_at(experts, str(name), int(last["step"]))
        at = int(last["step"]) if at is None else at
        when = "" if at == int(last["step"]) else f" at step {at:,} (the last window with per-expert rows)"
        load = mine["load"].to_numpy(dtype=float)
        if over.mean() >= th.router_imbalanced_share and len(recent) >= 2:
            out.append(_finding(
                "router_imbalance", "warning", str(name), streak_start(g["step"], g["max_violation"] >
                                                                       th.router_max_violation),
                f"layer {name!r} is imbalanced: MaxVio (max load / mean load - 1) above {th.router_max_violation:g} "
                f"in {over.mean():.0%} of the last {len(recent)} windows (now {last['max_violation']:.2f}); its "
                "busiest expert gets that much more than an even share of the tokens.",
                float(last["max_violation"]), "MaxVio now"))
        if len(load) >= 3 and load.sum() > 0:
            order = np.sort(load)[::-1]
            holding = int((np.cumsum(order) / order.sum() < 0.9).sum()) + 1
            if holding <= max(1, math.floor(th.collapse_experts * len(load))):
                out.append(_finding(
                    "router_collapse", "error", str(name), at,
                    f"router {name!r} has collapsed: {holding} of {len(load)} experts receive 90% of the dispatched "
                    f"tokens{when}."))
        dead = mine[mine["load"] < th.dead_fraction * np.nanmean(load)] if len(load) else mine.iloc[:0]
        if len(dead):
            names = ", ".join(bare(dead["expert_name"].astype(str).tolist()[:12], str(name)))
            more = f" and {len(dead) - 12} more" if len(dead) > 12 else ""
            out.append(_finding(
                "router_dead", "warning", str(name), at,
                f"layer {name!r} has {len(dead)} dead expert(s) of {len(load)}: {names}{more} receive less than "
                f"{th.dead_fraction:.0%} of the mean load{when}.", len(dead), f"of {len(load)} experts dead"))
        out += _bias_growing(g, str(name), th)
    return out


def _bias_growing(g: pd.DataFrame, name: str, th: Thresholds) -> list[Finding]:
    recent = g.dropna(subset=["bias_max"]).tail(int(th.router_windows))
    if len(recent) < 3:
        return []
    bias = recent["bias_max"].to_numpy(dtype=float)
    growing = bool((np.diff(bias) > 0).all()) and bias[-1] > 0
    imbalanced = bool((recent["max_violation"] > th.router_max_violation).mean() >= th.router_imbalanced_share)
    if not (growing and imbalanced):
        return []
    return [_finding(
        "router_bias_growing", "warning", name, int(recent["step"].iloc[0]),
        f"layer {name!r}: the expert bias kept growing (largest |bias| {bias[0]:.3g} -> {bias[-1]:.3g} over "
        f"{len(recent)} windows) while MaxVio stayed above {th.router_max_violation:g}.", float(bias[-1]),
        "largest |bias|")]


def router_balance(run: Run, thresholds: Thresholds) -> list[dict[str, Any]]:
    """``balance[]`` of the gates quantity, with each router's dispatch view in its last window: ``load`` from
    the router's own indices, ``max_violation``, ``dead`` (dispatch load below ``dead_fraction`` of the mean),
    ``dropped`` (per expert; None without capacity), ``bias`` (per expert; None without one) and
    ``bias_changed`` (share of tokens; None without a bias). Other gates get these keys as None. The per-expert
    figures come from the latest window with per-expert rows (``expert_step`` when it is earlier than ``step``)."""
    out = gate_balance(run, thresholds)
    routers = run.table("routers")
    routers = routers[routers["tokens"] > 0]
    experts = run.table("router_experts")
    for entry in out:
        entry.update(max_violation=None, dropped=None, bias=None, bias_changed=None)
        mine = routers[routers["gate"] == entry["gate"]]
        if not len(mine):
            continue
        row = mine.sort_values("step").iloc[-1]
        ex, _ = per_expert_at(experts, str(entry["gate"]), int(row["step"]))
        load = ex["load"].to_numpy(dtype=float)
        entry.update(
            load=[num(v) for v in load], max_violation=num(row["max_violation"]),
            dead=ex.loc[ex["load"] < thresholds.dead_fraction * np.nanmean(load), "expert_name"].astype(str).tolist(),
            dropped=None if ex["dropped"].isna().all() else [num(v) for v in ex["dropped"]],
            bias=None if ex["bias"].isna().all() else [num(v) for v in ex["bias"]],
            bias_changed=num(row["bias_changed"]), step=int(row["step"]),
        )
        entry.pop("expert_step", None)
        entry.update(expert_step(int(row["step"]), ex))
    return out


QUANTITY = ReadHalf(
    tables=TABLES, windowed=("routers", "router_experts"), scalars=router_scalars,
    sections=(Section("balance", router_balance, extends=True),), rules=(router_findings,),
    remedy_texts=REMEDY_TEXTS,
    pages=(Page("routers", "Routers", ":material/alt_route:", "gatewatch.app.views.routers", 40,
                "?run=deepseek-routers", 8),),  # load, MaxVio and bias heatmaps; MaxVio and bias-changed lines;
    # the co-activation and routing-stability panels: P(j|i) and stability heatmaps, the saturation curve
    figures=("gatewatch.figures.routers",),
)
