"""Sparse routers, per layer: the dispatch load of every expert (layer x expert heatmap at one window), MaxVio
per layer over training (layer x window heatmap and lines), the expert bias and the dropped tokens."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ._style import (
    MAX_COLUMNS,
    MAX_POINTS,
    STEP_AXIS,
    downsample,
    layout,
    natural_key,
    nearest_step,
    no_data,
    series_colours,
)

NO_ROUTERS = "no sparse router in this run (the Routers page needs a router's dispatch: see docs/guide.md)"


def _layers(df: pd.DataFrame) -> list[str]:
    return sorted(df["gate"].astype(str).unique(), key=natural_key)


def _short(names: list[str]) -> dict[str, str]:
    """Layer labels without the path shared by all (``model.layers.3.mlp.gate`` -> ``3``)."""
    if len(names) < 2:
        return {n: n for n in names}
    parts = [n.split(".") for n in names]
    head = 0
    while all(len(p) > head + 1 and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    return {n: ".".join(p[head:len(p) - tail]) or n for n, p in zip(names, parts, strict=True)}


def load_heatmap(router_experts: pd.DataFrame, step: int | None = None, *, value: str = "load") -> go.Figure:
    """Layer x expert heatmap of ``value`` (the dispatch load, or ``bias``/``dropped``) in the window at ``step``."""
    what = {"load": "dispatch load", "bias": "expert bias", "dropped": "dropped share"}[value]
    rows = router_experts.dropna(subset=[value])
    title = f"{what.capitalize()} per layer and expert"
    if not len(rows):
        return no_data(title, NO_ROUTERS if value == "load" else f"no {what} in this run")
    at = nearest_step(rows["step"], step)
    rows = rows[rows["step"] == at]
    layers = _layers(rows)
    short = _short(layers)
    grid = rows.pivot_table(index="gate", columns="expert", values=value, aggfunc="mean").reindex(layers)
    fig = go.Figure(go.Heatmap(
        z=grid.to_numpy(), x=[str(c) for c in grid.columns], y=[short[g] for g in layers],
        colorscale="RdBu_r" if value == "bias" else "Viridis", zmid=0 if value == "bias" else None,
        colorbar={"title": {"text": value}},
        hovertemplate="layer %{y}, expert %{x}: %{z:.3f}<extra></extra>",
    ))
    layout(fig, title=f"{title}, step {at:,}", x="expert",
           y="layer", height=max(300, 40 + 22 * len(layers)), hover="closest")
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig


def max_violation_heatmap(routers: pd.DataFrame, *, max_columns: int = MAX_COLUMNS) -> go.Figure:
    """Layer x window heatmap of MaxVio (max load / mean load - 1); windows averaged in buckets when many."""
    title = "MaxVio per layer over training (max load / mean load - 1)"
    rows = routers[routers["tokens"] > 0].dropna(subset=["max_violation"])
    if not len(rows):
        return no_data(title, NO_ROUTERS)
    rows = downsample(rows, ["gate"], ["max_violation"], max_columns)
    return gate_step_heatmap(rows, "max_violation", _layers(rows), title=title, axis="layer", colorscale="Reds",
                             colorbar="MaxVio", hover="layer %{y}, step %{x}: MaxVio %{z:.2f}<extra></extra>")


def gate_step_heatmap(rows: pd.DataFrame, column: str, gates: list[str], *, title: str, axis: str, colorscale: str,
                      colorbar: str, hover: str) -> go.Figure:
    """A gate (or layer) x step heatmap of ``column`` (0 at the bottom of the colour scale), gates in ``gates``
    order top to bottom, named by their shortest distinct suffix."""
    short = _short(gates)
    grid = rows.pivot_table(index="gate", columns="step", values=column, aggfunc="mean").reindex(gates)
    fig = go.Figure(go.Heatmap(
        z=grid.to_numpy(), x=grid.columns.to_numpy(), y=[short[g] for g in gates], colorscale=colorscale, zmin=0,
        colorbar={"title": {"text": colorbar}}, hovertemplate=hover,
    ))
    layout(fig, title=title, y=axis, height=max(300, 40 + 22 * len(gates)), hover="closest")
    fig.update_yaxes(autorange="reversed", type="category")
    return fig


def router_curves(routers: pd.DataFrame, metric: str = "max_violation", *, max_points: int = MAX_POINTS
                  ) -> go.Figure:
    """One line per layer of a ``routers`` column over training (MaxVio, dropped, bias_max, bias_changed ...)."""
    names = {"max_violation": "MaxVio", "dropped": "dropped share of tokens", "bias_max": "largest |expert bias|",
             "bias_changed": "tokens whose choice the bias changed", "margin": "top-k boundary margin",
             "dead": "experts with no token"}
    label = names.get(metric, metric)
    title = f"{label[0].upper()}{label[1:]} per layer"
    rows = routers[routers["tokens"] > 0].dropna(subset=[metric])
    if not len(rows):
        return no_data(title, NO_ROUTERS if metric == "max_violation" else f"no {names.get(metric, metric)} "
                       "in this run")
    rows = downsample(rows, ["gate"], [metric], max_points)
    layers = _layers(rows)
    short = _short(layers)
    colours = series_colours(layers)
    fig = go.Figure()
    for gate in layers:
        s = rows[rows["gate"] == gate].sort_values("step")
        fig.add_trace(go.Scatter(x=s["step"], y=s[metric], name=f"layer {short[gate]}", mode="lines",
                                 line={"color": colours[gate], "width": 1.5}))
    if metric == "max_violation" and len(layers) > 8:  # many layers: the median and the worst say more than lines
        q = rows.groupby("step")[metric]
        fig.add_trace(go.Scatter(x=q.median().index, y=q.median().to_numpy(), name="median over layers",
                                 line={"color": "black", "width": 3}))
    layout(fig, title=title, x=STEP_AXIS, y="share" if metric in ("bias_changed", "dropped") else
           names.get(metric, metric), legend="layer")
    return fig


def router_summary(routers: pd.DataFrame) -> pd.DataFrame:
    """The last window of each layer: tokens, MaxVio, dead experts, margin, dropped, bias figures."""
    rows = routers[routers["tokens"] > 0]
    if not len(rows):
        return pd.DataFrame()
    last = rows.sort_values("step").groupby("gate", sort=False).tail(1)
    last = last.set_index("gate").reindex(_layers(last))
    cols = ["step", "experts", "top_k", "tokens", "max_violation", "dead", "margin", "small_margin", "dropped",
            "bias_changed", "bias_max"]
    return last[cols].dropna(axis=1, how="all").astype({"step": np.int64})


__all__ = ["load_heatmap", "max_violation_heatmap", "router_curves", "router_summary"]
