"""Runs side by side on the same axes (e.g. with and without gate dropout), and the loss curves of a run.

Every function takes ``{run name: table}`` and draws one colour per run, one panel per task (or task pair).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..stats import load_cv_by
from ._style import MAX_POINTS, STEP_AXIS, downsample, layout, natural_key, no_data, series_colours
from .conflict import NO_CONFLICT, pair_rows

GATE_METRICS = {  # column -> (label, y axis)
    "top_share": ("largest mean share", "mean gate weight"),
    "entropy": ("normalised entropy", "entropy / log E"),
    "polarization": ("polarized samples", "share of samples"),
    "effective_experts": ("effective experts", "exp(entropy of the mean gate)"),
    "mutual_info": ("input-expert information", "mutual information / log E"),
    "drift": ("drift between windows", "Jensen-Shannon (bits)"),
}


def _panels(runs: Mapping[str, pd.DataFrame], panel: str, value: str, *, title: str, y: str, empty: str,
            max_points: int, height_per_row: int = 300, fmt: str = ".3f") -> go.Figure:
    """One subplot per value of column ``panel``, one line per run in each."""
    frames = [df.dropna(subset=[value]).assign(run=name) for name, df in runs.items() if len(df)]
    frames = [f for f in frames if len(f)]
    if not frames:
        return no_data(title, empty)
    rows = pd.concat([downsample(f, ["run", panel], [value], max_points) for f in frames], ignore_index=True)
    rows[panel] = rows[panel].astype(str)
    names = sorted(rows[panel].unique(), key=natural_key)
    cols = min(2, len(names))
    n_rows = math.ceil(len(names) / cols)
    fig = make_subplots(rows=n_rows, cols=cols, subplot_titles=names, shared_xaxes=True,
                        vertical_spacing=min(0.12, 0.3 / n_rows), horizontal_spacing=0.08)
    colours = series_colours(list(runs))
    for i, name in enumerate(names):
        r, c = divmod(i, cols)
        for run, s in rows[rows[panel] == name].groupby("run", sort=False):
            fig.add_trace(go.Scatter(x=s["step"], y=s[value], name=run, legendgroup=run, showlegend=i == 0,
                                     mode="lines", line={"color": colours[run], "width": 1.5},
                                     hovertemplate=f"{run}: %{{y:{fmt}}}<extra></extra>"), row=r + 1, col=c + 1)
        fig.update_yaxes(title_text=y if c == 0 else None, row=r + 1, col=c + 1)
        fig.update_xaxes(title_text=STEP_AXIS if r == n_rows - 1 else None, row=r + 1, col=c + 1)
    return layout(fig, title=title, x=None, height=90 + height_per_row * n_rows, legend="run")


def compare_gate_metric(runs: Mapping[str, pd.DataFrame], metric: str = "top_share", *,
                        max_points: int = MAX_POINTS) -> go.Figure:
    """A gate metric (a column of the ``gates`` table) per gate, one line per run."""
    if metric not in GATE_METRICS:
        raise ValueError(f"metric must be one of {sorted(GATE_METRICS)}, got {metric!r}.")
    label, y = GATE_METRICS[metric]
    gates = {name: df[df["samples"] > 0] for name, df in runs.items()}
    return _panels(gates, "gate", metric, title=f"{label.capitalize()} per gate, by run", y=y,
                   empty="no gate windows in these runs", max_points=max_points)


def compare_load_balance(runs: Mapping[str, pd.DataFrame], *, max_points: int = MAX_POINTS) -> go.Figure:
    """Coefficient of variation of expert utilization over training (0 = even load), one line per run."""
    per_run = {}
    for name, df in runs.items():
        rows = df.dropna(subset=["utilization"])
        if len(rows):
            cv = load_cv_by(rows, "step")
            per_run[name] = pd.DataFrame({"step": cv.index, "what": "load balance", "cv": cv.to_numpy()})
    return _panels(per_run, "what", "cv", title="Load balance over training, by run",
                   y="utilization std / mean", empty="no expert utilization in these runs", max_points=max_points)


def loss_curves(runs: Mapping[str, pd.DataFrame], *, max_points: int = MAX_POINTS) -> go.Figure:
    """Mean training loss per task over training, one line per run."""
    return _panels(runs, "task", "loss", title="Training loss per task", y="loss (window mean)",
                   empty="no losses recorded (pass them through watch.backward or watch.log_losses)",
                   max_points=max_points, height_per_row=260, fmt=".4f")


def compare_conflict(runs: Mapping[str, pd.DataFrame], *, max_points: int = MAX_POINTS) -> go.Figure:
    """Gradient cosine over all shared parameters per task pair, one line per run."""
    per_run = {}
    for name, df in runs.items():
        rows = pair_rows(df, "all")
        if len(rows):
            per_run[name] = rows
    fig = _panels(per_run, "pair", "cosine", title="Gradient cosine between tasks, by run",
                  y="gradient cosine", empty=NO_CONFLICT, max_points=max_points)
    if per_run:
        fig.add_hline(y=0, line_color="#999", line_width=1)
    return fig


def compare_eval(runs: Mapping[str, pd.DataFrame], *, split: str | None = None,
                 max_points: int = MAX_POINTS) -> go.Figure:
    """Held-out metrics (the ``eval`` table) per task and metric, one line per run."""
    per_run = {}
    for name, df in runs.items():
        rows = df if split is None else df[df["split"] == split]
        if len(rows):
            per_run[name] = rows.assign(panel=[f"{t}: {m} ({s})" for t, m, s in
                                               zip(rows["task"], rows["metric"], rows["split"], strict=True)])
    return _panels(per_run, "panel", "value", title="Held-out evaluation, by run", y="value",
                   empty="no evaluations recorded in these runs", max_points=max_points, height_per_row=260,
                   fmt=".4f")


__all__ = ["GATE_METRICS", "compare_conflict", "compare_eval", "compare_gate_metric", "compare_load_balance",
           "loss_curves"]
