"""How much each expert is used across tasks: utilization over training, dead experts, load balance."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..stats import load_cv_by
from ._style import (
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

UTIL_AXIS = "utilization (mean gate weight over gates)"


def dead_experts(experts: pd.DataFrame, dead_fraction: float) -> list[str]:
    """Experts whose utilization in the last window is below ``dead_fraction`` of an even split (as in findings)."""
    rows = experts.dropna(subset=["utilization"])
    if not len(rows):
        return []
    last = rows[rows["step"] == rows["step"].max()]
    return ordered(last.loc[last["utilization"] < dead_fraction * last["reference"], "expert"])


def utilization_over_time(experts: pd.DataFrame, *, dead_fraction: float = 0.1, max_points: int = MAX_POINTS
                          ) -> go.Figure:
    """One line per expert; the even split (1/E) dashed, the dead line dotted, dead experts dashed and named."""
    title = "Expert utilization over training"
    rows = experts.dropna(subset=["utilization"]).assign(expert=lambda d: d["expert"].astype(str))
    if not len(rows):
        return no_data(title, "no expert utilization written yet")
    dead = set(dead_experts(rows, dead_fraction))
    rows = downsample(rows, ["expert"], ["utilization", "reference"], max_points)
    colours = expert_colours(rows["expert"])
    fig = go.Figure()
    for name, colour in colours.items():
        s = rows[rows["expert"] == name].sort_values("step")
        label = f"expert {name}" + (" (dead)" if name in dead else "")
        fig.add_trace(go.Scatter(
            x=s["step"], y=s["utilization"], name=label, mode="lines",
            line={"color": colour, "width": 1.6, "dash": "dash" if name in dead else "solid"},
            hovertemplate=f"{label}: %{{y:.3f}}<extra></extra>",
        ))
    ref = rows.groupby("step", sort=True)["reference"].mean()
    fig.add_trace(go.Scatter(x=ref.index, y=ref.to_numpy(), name="even split (1/E)", mode="lines",
                             line={"color": "#888", "dash": "dash", "width": 1}, hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=ref.index, y=ref.to_numpy() * dead_fraction, mode="lines",
                             name=f"dead below ({dead_fraction:g} x 1/E)",
                             line={"color": "#C44", "dash": "dot", "width": 1}, hoverinfo="skip"))
    fig.update_yaxes(rangemode="tozero")
    return layout(fig, title=title, y=UTIL_AXIS, legend="expert")


def utilization_at_step(experts: pd.DataFrame, step: int | None = None, *, dead_fraction: float = 0.1
                        ) -> go.Figure:
    """Bars of each expert's utilization in the window ending at ``step``; dead experts hatched and labelled."""
    rows = experts.dropna(subset=["utilization"])
    at = nearest_step(rows["step"], step)
    title = "Expert utilization" + (f" at step {at}" if at is not None else "")
    if at is None:
        return no_data(title, "no expert utilization written yet")
    rows = rows[rows["step"] == at].assign(expert=lambda d: d["expert"].astype(str))
    rows = rows.set_index("expert").loc[sorted(rows["expert"], key=natural_key)]
    colours = expert_colours(rows.index)
    dead = rows["utilization"] < dead_fraction * rows["reference"]
    fig = go.Figure(go.Bar(
        x=[f"expert {e}" for e in rows.index], y=rows["utilization"], marker_color=[colours[e] for e in rows.index],
        marker_pattern_shape=["x" if d else "" for d in dead], text=["dead" if d else "" for d in dead],
        textposition="outside", hovertemplate="%{x}: %{y:.3f}<extra></extra>", showlegend=False,
    ))
    even = float(rows["reference"].mean())
    fig.add_hline(y=even, line_dash="dash", line_color="#888", annotation_text="even split",
                  annotation_position="top right")
    return layout(fig, title=title, x="expert", y=UTIL_AXIS, height=380, hover="closest")


def utilization_by_task(shares: pd.DataFrame, step: int | None = None, *, gates: pd.DataFrame | None = None
                        ) -> go.Figure:
    """Grouped bars: each task's (gate's) mean weight on each expert in the window ending at ``step``."""
    rows = shares.dropna(subset=["share"])
    at = nearest_step(rows["step"], step)
    title = "Expert share per task" + (f" at step {at}" if at is not None else "")
    if at is None:
        return no_data(title, "no expert shares written yet")
    rows = rows[rows["step"] == at].assign(expert_name=lambda d: d["expert_name"].astype(str))
    labels = gate_labels(gates) if gates is not None else {}
    gate_order = ordered(rows["gate"])
    colours = series_colours([labels.get(g, g) for g in gate_order])
    experts = ordered(rows["expert_name"])
    fig = go.Figure()
    for g in gate_order:
        label = labels.get(g, g)
        s = rows[rows["gate"] == g].set_index("expert_name")["share"].reindex(experts)
        fig.add_trace(go.Bar(x=[f"expert {e}" for e in experts], y=s.to_numpy(), name=label,
                             marker_color=colours[label],
                             hovertemplate=f"{label} -> %{{x}}: %{{y:.3f}}<extra></extra>"))
    fig.update_layout(barmode="group")
    return layout(fig, title=title, x="expert", y="mean gate weight", legend="gate (task)", height=380,
                  hover="closest")


def load_balance(experts: pd.DataFrame, *, dead_fraction: float = 0.1, max_points: int = MAX_POINTS) -> go.Figure:
    """Two panels over training: the coefficient of variation of expert utilization (0 = perfectly even) and
    the number of dead experts."""
    title = "Load balance over training"
    rows = experts.dropna(subset=["utilization"])
    if not len(rows):
        return no_data(title, "no expert utilization written yet")
    per_step = rows.assign(dead=rows["utilization"] < dead_fraction * rows["reference"]).groupby("step").agg(
        dead=("dead", "sum"), experts=("utilization", "size"))
    per_step["cv"] = load_cv_by(rows, "step")
    per_step = downsample(per_step.reset_index(), [], ["cv", "dead", "experts"], max_points)
    fig = make_subplots(rows=1, cols=2, subplot_titles=["Coefficient of variation of utilization",
                                                        "Dead experts"], horizontal_spacing=0.12)
    fig.add_trace(go.Scatter(x=per_step["step"], y=per_step["cv"], name="load CV", mode="lines",
                             line={"color": "#4C78A8"}, hovertemplate="load CV: %{y:.3f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=per_step["step"], y=per_step["dead"], name="dead experts", mode="lines",
                             line={"color": "#C44", "shape": "hv"},
                             hovertemplate="dead experts: %{y:.1f}<extra></extra>"), row=1, col=2)
    fig.update_yaxes(title_text="std / mean over experts", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="experts", range=[0, max(1, float(per_step["experts"].max()))], row=1, col=2)
    fig.update_xaxes(title_text=STEP_AXIS)
    fig = layout(fig, title=title, x=None, height=340)
    fig.update_layout(showlegend=False)
    return fig


__all__ = ["dead_experts", "load_balance", "utilization_at_step", "utilization_by_task", "utilization_over_time"]
