"""Sample groups on a shared gate: where each group's rows go (group x expert heatmap of one gate at one window)
and how far the gates specialise by group over training (layer x window heatmap, lines against the baseline)."""

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
from .routers import _short, gate_step_heatmap

NO_GROUPS = ("no sample groups in this run: pass GateWatch(..., sample_groups=[names]) and label each batch with "
             "`with watch.grouped(labels): out = model(x)` (docs/guide.md)")
WHAT = {"share": "mean affinity", "load": "dispatch share"}


def _gates(df: pd.DataFrame) -> list[str]:
    return sorted(df["gate"].astype(str).unique(), key=natural_key)


def group_detail_steps(group_routing: pd.DataFrame, gate: str | None = None) -> list[int]:
    """The windows that keep the per-expert lists (of ``gate``, or of any gate)."""
    rows = group_routing[group_routing["share"].notna()]
    if gate is not None:
        rows = rows[rows["gate"] == gate]
    return sorted(int(s) for s in rows["step"].unique())


def group_heatmap(group_routing: pd.DataFrame, gate: str, step: int | None = None, *,
                  value: str = "share") -> go.Figure:
    """Group x expert heatmap of one gate at the window at or before ``step``: ``share`` (the group's mean
    affinity per expert) or ``load`` (the share of its tokens dispatched to each expert; routers only)."""
    title = f"{WHAT[value].capitalize()} per group and expert, {gate}"
    rows = group_routing[(group_routing["gate"] == gate) & group_routing[value].notna()]
    if not len(rows):
        return no_data(title, NO_GROUPS if value == "share" or not len(group_routing) else
                       "no dispatch for this gate: it is a dense gate (its share is the affinity)")
    at = nearest_step(rows["step"], step)
    rows = rows[rows["step"] == at]
    groups = list(dict.fromkeys(rows["group"].astype(str)))
    z = np.stack([np.asarray(v, dtype=float) for v in rows[value]])
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(e) for e in range(z.shape[1])], y=groups, colorscale="Viridis", zmin=0,
        colorbar={"title": {"text": value}}, customdata=np.repeat(rows["tokens"].to_numpy()[:, None], z.shape[1], 1),
        hovertemplate="group %{y}, expert %{x}: %{z:.3f} (%{customdata:,.0f} rows)<extra></extra>",
    ))
    layout(fig, title=f"{title}, step {at:,}", x="expert", y="group", height=max(260, 120 + 40 * len(groups)),
           hover="closest")
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig


def specialisation_heatmap(group_specialisation: pd.DataFrame, *, above_baseline: bool = False,
                           max_columns: int = MAX_COLUMNS) -> go.Figure:
    """Gate (layer) x window heatmap of the specialisation I(G;E)/H(G) (``above_baseline``: minus its
    shuffled-label baseline); windows averaged in buckets when many."""
    title = "Specialisation by group per layer over training" + (" (above the shuffled-label baseline)"
                                                                   if above_baseline else "")
    rows = group_specialisation.dropna(subset=["value"])
    if not len(rows):
        return no_data(title, NO_GROUPS if not len(group_specialisation) else
                       "no window had two groups on a gate: the specialisation needs at least two")
    rows = rows.assign(shown=rows["value"] - rows["baseline"] if above_baseline else rows["value"])
    rows = downsample(rows, ["gate"], ["shown"], max_columns)
    return gate_step_heatmap(rows, "shown", _gates(rows), title=title, axis="gate", colorscale="Blues", colorbar="I/H",
                             hover="%{y}, step %{x}: %{z:.3f}<extra></extra>")


def specialisation_curves(group_specialisation: pd.DataFrame, gates: list[str] | None = None, *,
                          max_points: int = MAX_POINTS) -> go.Figure:
    """The specialisation I(G;E)/H(G) of each gate over training (solid) and its shuffled-label baseline
    (dotted); ``gates``: those to draw (default: all)."""
    title = "Specialisation by group over training (dotted: shuffled-label baseline)"
    rows = group_specialisation.dropna(subset=["value"])
    if gates is not None:
        rows = rows[rows["gate"].isin(gates)]
    if not len(rows):
        return no_data(title, NO_GROUPS if not len(group_specialisation) else
                       "no window had two groups on these gates: the specialisation needs at least two")
    rows = downsample(rows, ["gate"], ["value", "baseline"], max_points)
    names = _gates(rows)
    short, colours = _short(names), series_colours(names)
    fig = go.Figure()
    for gate in names:
        s = rows[rows["gate"] == gate].sort_values("step")
        fig.add_trace(go.Scatter(x=s["step"], y=s["value"], name=short[gate], mode="lines", legendgroup=gate,
                                 line={"color": colours[gate], "width": 2}))
        fig.add_trace(go.Scatter(x=s["step"], y=s["baseline"], name=f"{short[gate]} (shuffled)", mode="lines",
                                 legendgroup=gate, showlegend=False,
                                 line={"color": colours[gate], "width": 1, "dash": "dot"}))
    layout(fig, title=title, x=STEP_AXIS, y="I(G;E) / H(G)", legend="gate")
    fig.update_yaxes(rangemode="tozero")
    return fig


__all__ = ["group_detail_steps", "group_heatmap", "specialisation_curves", "specialisation_heatmap"]
