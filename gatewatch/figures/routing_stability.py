"""Routing stability and saturation on the probe batch: per layer over training."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from ..layer_names import short_names
from ._style import layout, natural_key, no_data

NO_PROBE = "no routing probe in this run (GateWatch(..., saturation_every=N) runs one every N steps)"


def stability_heatmap(routing_stability: pd.DataFrame, *, value: str = "stable") -> go.Figure:
    """Layer x probe-step heatmap of ``stable`` (the share of probe tokens whose top-k set is unchanged since the
    previous probe) or ``top1_agree``; layers labelled by their number when their names form one pattern."""
    what = {"stable": "Top-k set unchanged since the previous probe", "top1_agree": "Top-1 unchanged since the "
            "previous probe"}[value]
    rows = routing_stability.dropna(subset=[value])
    if not len(rows):
        return no_data(what, NO_PROBE)
    layers = sorted(rows["gate"].astype(str).unique(), key=natural_key)
    short = short_names(layers)
    grid = rows.pivot_table(index="gate", columns="step", values=value, aggfunc="mean").reindex(layers)
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=grid.columns.to_numpy(), y=[short[g] for g in layers],
                               colorscale="Viridis",
                               zmin=0, zmax=1, colorbar={"title": {"text": "share"}},
                               hovertemplate="%{y}, step %{x}: %{z:.3f}<extra></extra>"))
    layout(fig, title=what, y="layer", height=max(300, 60 + 14 * len(layers)),
           hover="closest")
    fig.update_yaxes(autorange="reversed", type="category")
    return fig


def saturation_curve(saturation: pd.DataFrame) -> go.Figure:
    """Saturation over training: the share of probe tokens whose top-k set equals the final model's, mean over
    layers with the lowest and highest layer as a band."""
    title = "Saturation: top-k set equals the final model's"
    if not len(saturation):
        return no_data(title, NO_PROBE + "; saturation is written at close()")
    by = saturation.groupby("step")["saturation"]
    stats = pd.DataFrame({"mean": by.mean(), "low": by.min(), "high": by.max()}).reset_index()
    fig = go.Figure([
        go.Scatter(x=stats["step"], y=stats["high"], line={"width": 0}, showlegend=False, hoverinfo="skip"),
        go.Scatter(x=stats["step"], y=stats["low"], fill="tonexty", line={"width": 0}, name="lowest - highest layer"),
        go.Scatter(x=stats["step"], y=stats["mean"], name="mean over layers", mode="lines+markers"),
    ])
    layout(fig, title=title, y="share of probe tokens")
    fig.update_yaxes(range=[0, 1.02])
    return fig


__all__ = ["saturation_curve", "stability_heatmap"]
