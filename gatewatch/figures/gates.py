"""What each gate did over training: expert shares, entropy, polarization, top weight, drift, weight histograms."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._style import (
    MAX_COLUMNS,
    MAX_POINTS,
    STEP_AXIS,
    downsample,
    expert_colours,
    gate_labels,
    layout,
    natural_key,
    nearest_step,
    no_data,
    ordered,
    series_colours,
)

SHARE_AXIS = "mean gate weight (share of the task's weight)"


def _one_gate(shares: pd.DataFrame, gate: str) -> pd.DataFrame:
    rows = shares[(shares["gate"] == gate) & shares["share"].notna()]
    return rows.assign(expert_name=rows["expert_name"].astype(str))


def share_area(shares: pd.DataFrame, gate: str, *, max_points: int = MAX_POINTS) -> go.Figure:
    """Stacked area: how the gate's mean weight splits over its experts, step by step (sums to 1)."""
    title = f"Expert share of gate {gate!r} over training"
    rows = _one_gate(shares, gate)
    if not len(rows):
        return no_data(title, f"gate {gate!r} has no windows with samples yet")
    rows = downsample(rows, ["expert_name"], ["share"], max_points)
    colours = expert_colours(rows["expert_name"])
    fig = go.Figure()
    for name in colours:
        s = rows[rows["expert_name"] == name].sort_values("step")
        fig.add_trace(go.Scatter(
            x=s["step"], y=s["share"], name=f"expert {name}", stackgroup="share", mode="lines",
            line={"width": 0.5, "color": colours[name]}, fillcolor=colours[name],
            hovertemplate=f"expert {name}: %{{y:.3f}}<extra></extra>",
        ))
    fig.update_yaxes(range=[0, 1])
    return layout(fig, title=title, y=SHARE_AXIS, legend="expert")


def share_heatmap(shares: pd.DataFrame, gate: str, *, max_columns: int = MAX_COLUMNS) -> go.Figure:
    """Heatmap experts x steps of the gate's mean weight on each expert."""
    title = f"Expert share of gate {gate!r} over training (experts x steps)"
    rows = _one_gate(shares, gate)
    if not len(rows):
        return no_data(title, f"gate {gate!r} has no windows with samples yet")
    rows = downsample(rows, ["expert_name"], ["share"], max_columns)
    grid = rows.pivot_table(index="expert_name", columns="step", values="share", aggfunc="mean")
    grid = grid.loc[sorted(grid.index, key=natural_key)]
    fig = go.Figure(go.Heatmap(
        z=grid.to_numpy(), x=grid.columns, y=[f"expert {e}" for e in grid.index], zmin=0, zmax=1,
        colorscale="Viridis", colorbar={"title": {"text": "share"}},
        hovertemplate="step %{x}<br>%{y}: %{z:.3f}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed")
    return layout(fig, title=title, y="expert", height=max(260, 80 + 28 * len(grid)), hover="closest")


CURVES = [  # (column, subplot title, y axis)
    ("entropy", "Normalised entropy (mean over samples)", "entropy / log E"),
    ("polarization", "Polarized samples", "share of samples"),
    ("top_share", "Top weight: largest mean share (dotted: mean per-sample top)", "gate weight"),
    ("drift", "Drift between windows", "Jensen-Shannon (bits)"),
]


def gate_curves(gates: pd.DataFrame, *, threshold: float = 0.9, max_points: int = MAX_POINTS,
                only: Sequence[str] | None = None) -> go.Figure:
    """Four panels, one line per gate: normalised entropy, share of polarized samples (top weight >= threshold),
    largest mean share (dotted: mean top weight per sample), and drift of the mean gate between windows."""
    title = "Gate health over training"
    rows = gates[gates["samples"] > 0]
    if only is not None:
        rows = rows[rows["gate"].isin(list(only))]
    if not len(rows):
        return no_data(title, "no gate windows with samples yet")
    labels = gate_labels(rows)
    colours = series_colours(labels.values())
    values = [c for c, _, _ in CURVES] + ["max_weight", "entropy_of_mean"]
    rows = downsample(rows, ["gate"], values, max_points)
    subtitles = [t if c != "polarization" else f"{t} (top weight >= {threshold:g})" for c, t, _ in CURVES]
    fig = make_subplots(rows=2, cols=2, shared_xaxes=True, subplot_titles=subtitles, vertical_spacing=0.14,
                        horizontal_spacing=0.12)
    for g, label in labels.items():
        s = rows[rows["gate"] == g].sort_values("step")
        colour = colours[label]
        for i, (col, _, _) in enumerate(CURVES):
            r, c = divmod(i, 2)
            fig.add_trace(go.Scatter(
                x=s["step"], y=s[col], name=label, legendgroup=label, showlegend=i == 0, mode="lines",
                line={"color": colour, "width": 1.6}, hovertemplate=f"{label}: %{{y:.3f}}<extra></extra>",
            ), row=r + 1, col=c + 1)
        fig.add_trace(go.Scatter(
            x=s["step"], y=s["max_weight"], name=f"{label}: mean top weight", legendgroup=label, showlegend=False,
            mode="lines", line={"color": colour, "width": 1, "dash": "dot"},
            hovertemplate=f"{label} mean top weight per sample: %{{y:.3f}}<extra></extra>",
        ), row=2, col=1)
    for i, (_, _, y) in enumerate(CURVES):
        r, c = divmod(i, 2)
        fig.update_yaxes(title_text=y, row=r + 1, col=c + 1, rangemode="tozero")
        fig.update_xaxes(title_text=STEP_AXIS if r == 1 else None, row=r + 1, col=c + 1)
    for r, c in ((1, 1), (1, 2), (2, 1)):
        fig.update_yaxes(range=[0, 1.02], row=r, col=c)
    return layout(fig, title=title, x=None, height=620, legend="gate")


def weight_histogram(hist: pd.DataFrame, step: int | None = None, *, only: Sequence[str] | None = None
                     ) -> go.Figure:
    """Distribution of the individual gate weights (all samples x experts) in the window ending at ``step``."""
    at = nearest_step(hist["step"], step)
    title = "Distribution of gate weights" + (f" at step {at}" if at is not None else "")
    if at is None:
        return no_data(title, "no gate-weight histogram written yet")
    rows = hist[hist["step"] == at]
    if only is not None:
        rows = rows[rows["gate"].isin(list(only))]
    gates = ordered(rows["gate"])
    colours = series_colours(gates)
    fig = go.Figure()
    for g in gates:
        s = rows[rows["gate"] == g].sort_values("bin")
        total = s["count"].sum()
        fraction = s["count"] / total if total > 0 else s["count"] * np.nan
        fig.add_trace(go.Bar(
            x=(s["lo"] + s["hi"]) / 2, y=fraction, width=(s["hi"] - s["lo"]) * 0.9 / max(len(gates), 1),
            name=g, marker_color=colours[g], customdata=np.c_[s["lo"], s["hi"]],
            hovertemplate=f"{g}: weights in [%{{customdata[0]:.2f}}, %{{customdata[1]:.2f}}): "
                          "%{y:.1%}<extra></extra>",
        ))
    fig.update_layout(barmode="group")
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(tickformat=".0%")
    return layout(fig, title=title, x="gate weight", y="share of all weights", legend="gate", hover="closest")


def task_expert_matrix(shares: pd.DataFrame, step: int | None = None, *, gates: pd.DataFrame | None = None
                       ) -> go.Figure:
    """Task (gate) x expert matrix of mean gate weights in the window ending at ``step`` (MMoE/PLE papers' figure).

    Gates of different experts (PLE levels, per-layer routers) share one matrix; an expert a gate does not
    mix is left blank.
    """
    at = nearest_step(shares.loc[shares["share"].notna(), "step"], step)
    title = "Expert utilization per task" + (f" at step {at}" if at is not None else "")
    if at is None:
        return no_data(title, "no expert shares written yet")
    rows = shares[shares["step"] == at].assign(expert_name=lambda d: d["expert_name"].astype(str))
    labels = gate_labels(gates) if gates is not None else {}
    grid = rows.pivot_table(index="gate", columns="expert_name", values="share", aggfunc="mean")
    grid = grid.loc[sorted(grid.index, key=natural_key), sorted(grid.columns, key=natural_key)]
    text = np.where(np.isnan(grid.to_numpy()), "", np.char.mod("%.2f", np.nan_to_num(grid.to_numpy())))
    fig = go.Figure(go.Heatmap(
        z=grid.to_numpy(), x=[f"expert {e}" for e in grid.columns], y=[labels.get(g, g) for g in grid.index],
        zmin=0, zmax=1, colorscale="Blues", text=text, texttemplate="%{text}", colorbar={"title": {"text": "share"}},
        hovertemplate="%{y} -> %{x}: %{z:.3f}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(side="bottom")
    return layout(fig, title=title, x="expert", y="gate (task)", height=max(260, 120 + 40 * len(grid)),
                  hover="closest")


__all__ = ["gate_curves", "share_area", "share_heatmap", "task_expert_matrix", "weight_histogram"]
