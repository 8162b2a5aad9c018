"""Ablation results as figures: the knock-out matrix, the gate-dropout sweep, the training comparison.

Each function takes the DataFrame that :mod:`gatewatch.ablation` returns (or reads back from
``RUN/ablations/<kind>.parquet``) and draws one panel per task, with the task's main metric (AUC, else
MSE, else loss) unless ``metric=`` names another one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..metric_direction import HIGHER_IS_BETTER, primary_metric
from ._style import SERIES_COLOURS, layout, natural_key, no_data, series_colours

HARM_SCALE = [[0.0, "#2166AC"], [0.5, "#F7F7F7"], [1.0, "#B2182B"]]  # blue = better, red = worse
HEALTH = {  # column -> panel title
    "polarized_gates": "polarized gates",
    "dead_experts": "dead experts",
    "mean_entropy": "mean gate entropy (/ log E)",
}


def _metric_of(rows: pd.DataFrame, metric: str | None) -> str | None:
    names = rows["metric"].astype(str).unique().tolist()
    if metric is None:
        return primary_metric(names) if names else None
    return metric if metric in names else None


def _task_frames(df: pd.DataFrame, metric: str | None) -> list[tuple[str, str, pd.DataFrame]]:
    """(task, metric, rows) per task, in the order the tasks appear."""
    out = []
    for task, rows in df.groupby("task", sort=False):
        name = _metric_of(rows, metric)
        if name is not None:
            out.append((str(task), name, rows[rows["metric"] == name]))
    return out


def _grid(titles: Sequence[str], cols: int, vertical_spacing: float | None = None, **kwargs: object
          ) -> tuple[go.Figure, int, int]:
    """A figure with one subplot per title, ``cols`` per row at most; returns it with its columns and rows."""
    cols = max(1, min(cols, len(titles)))
    n_rows = math.ceil(len(titles) / cols)
    spacing = min(0.15, 0.35 / n_rows) if vertical_spacing is None else vertical_spacing
    fig = make_subplots(rows=n_rows, cols=cols, subplot_titles=list(titles),
                        vertical_spacing=spacing, horizontal_spacing=0.08, **kwargs)
    return fig, cols, n_rows


def _place(i: int, cols: int) -> dict[str, int]:
    """``row=`` and ``col=`` (1-based) of the ``i``-th subplot of a grid with ``cols`` columns."""
    r, c = divmod(i, cols)
    return {"row": r + 1, "col": c + 1}


def _direction(metric: str) -> str:
    return "higher is better" if metric.lower() in HIGHER_IS_BETTER else "lower is better"


def _panel_titles(panels: Sequence[tuple[str, str, pd.DataFrame]]) -> list[str]:
    return [f"task {t} - {m} ({_direction(m)})" for t, m, _ in panels]


MAX_ANNOTATED = 16  # experts per panel up to which the knock-out cells carry their value


def knockout_heatmap(df: pd.DataFrame, *, metric: str | None = None, tasks: Sequence[str] | None = None
                     ) -> go.Figure:
    """Gate x expert matrix per task: the harm of knocking that expert out of that gate.

    Harm is the metric change signed so that positive is worse (``delta`` for losses, ``-delta`` for
    AUC); red = the task gets worse, blue = better, white = no change (the colour scale is centred at 0
    and symmetric per task). One panel per row, so that the cells are wide enough to carry their value (two
    significant digits, up to :data:`MAX_ANNOTATED` experts); hovering shows base, ablated and delta.
    """
    title = "Expert knock-out: harm to each task (red = worse without that expert)"
    if df is None or not len(df):
        return no_data(title, "no knock-out results yet: run one (gatewatch ablate RUN --knockout)")
    if tasks is not None:
        df = df[df["task"].isin(list(tasks))]
    panels = _task_frames(df, metric)
    if not panels:
        return no_data(title, f"no rows for metric {metric!r}")
    gates = list(dict.fromkeys(df["gate"].astype(str)))
    panel, gap, margins = max(60, 40 * len(gates)), 100, 110  # px: a panel, between panels (ticks, titles), margins
    plot = len(panels) * panel + (len(panels) - 1) * gap
    fig, cols, _ = _grid(_panel_titles(panels), cols=1, vertical_spacing=gap / plot)
    for i, (_task, name, rows) in enumerate(panels):
        experts = sorted(rows["expert_name"].astype(str).unique(), key=natural_key)
        cell = rows.assign(gate=rows["gate"].astype(str), expert_name=rows["expert_name"].astype(str))
        cell = cell.set_index(["gate", "expert_name"])
        z = [[_at(cell, g, e, "harm") for e in experts] for g in gates]
        hover = [[_hover(cell, g, e, name) for e in experts] for g in gates]
        bound = max((abs(v) for row in z for v in row if v is not None), default=0.0) or 1.0
        place = _place(i, cols)
        fig.add_trace(go.Heatmap(
            z=z, x=experts, y=gates, zmid=0, zmin=-bound, zmax=bound, colorscale=HARM_SCALE, showscale=False,
            texttemplate="%{z:+.2g}" if len(experts) <= MAX_ANNOTATED else None, text=hover,
            hovertemplate="%{text}<extra></extra>", xgap=1, ygap=1,
        ), **place)
        fig.update_xaxes(title_text="expert knocked out", type="category", **place)
        fig.update_yaxes(title_text="gate", type="category", autorange="reversed", **place)
    return layout(fig, title=title, x=None, height=margins + plot, hover="closest")


def _at(cell: pd.DataFrame, gate: str, expert: str, column: str) -> float | None:
    """The cell's value; None (an empty cell) where the gate does not mix the expert (CGC/PLE) or it is NaN."""
    if (gate, expert) not in cell.index:
        return None
    value = float(cell.loc[(gate, expert), column])
    return None if math.isnan(value) else value


def _hover(cell: pd.DataFrame, gate: str, expert: str, metric: str) -> str:
    if (gate, expert) not in cell.index:
        return f"gate {gate} does not mix expert {expert}"
    row = cell.loc[(gate, expert)]
    return (f"gate {gate}, expert {expert} knocked out<br>{metric}: {row['base']:.4f} -> {row['ablated']:.4f} "
            f"(delta {row['delta']:+.4f})")


def sweep_curves(df: pd.DataFrame, *, metric: str | None = None) -> go.Figure:
    """Each task's metric against the gate dropout rate: mean over seeds, +- one std, and every seed's point.

    A task whose gate is polarized falls off quickly (brittle); a healthy one degrades gracefully. With a
    ``run`` column (several runs' sweeps concatenated) each panel has one line per run.
    """
    title = "Gate dropout at evaluation: metric vs dropout rate"
    if df is None or not len(df):
        return no_data(title, "no sweep results yet: run one (gatewatch ablate RUN --dropout-sweep 0,0.1,0.2)")
    panels = _task_frames(df, metric)
    if not panels:
        return no_data(title, f"no rows for metric {metric!r}")
    fig, cols, n_rows = _grid(_panel_titles(panels), cols=2)
    by_run = "run" in df.columns and df["run"].nunique() > 1
    colours = series_colours(df["run"].unique() if by_run else [t for t, _, _ in panels])
    for i, (task, name, rows) in enumerate(panels):
        place = _place(i, cols)
        for series, part in (rows.groupby("run", sort=False) if by_run else [(task, rows)]):
            stats = part.groupby("rate")["value"].agg(["mean", "std"]).reset_index().sort_values("rate")
            label = str(series)
            fig.add_trace(go.Scatter(
                x=part["rate"], y=part["value"], mode="markers", name=f"{label}: seeds", showlegend=False,
                legendgroup=label, marker={"color": colours[label], "size": 5, "opacity": 0.35},
                customdata=part["seed"], hovertemplate=f"{label}, rate %{{x}}, seed %{{customdata}}: %{{y:.4f}}"
                                                        "<extra></extra>",
            ), **place)
            fig.add_trace(go.Scatter(
                x=stats["rate"], y=stats["mean"], mode="lines+markers", name=label, legendgroup=label,
                showlegend=by_run and i == 0, line={"color": colours[label], "width": 2},
                error_y={"type": "data", "array": stats["std"].fillna(0), "visible": True, "thickness": 1},
                hovertemplate=f"{label}, rate %{{x}}: mean {name} %{{y:.4f}}<extra></extra>",
            ), **place)
        fig.update_xaxes(title_text="gate dropout rate", **place)
        fig.update_yaxes(title_text=name, **place)
    return layout(fig, title=title, x=None, height=90 + 300 * n_rows, hover="closest",
                  legend="run" if by_run else None)


def comparison_figure(df: pd.DataFrame, *, metric: str | None = None) -> go.Figure:
    """Training with gate dropout: each task's metric per rate (one point per seed, box over seeds), then
    the gate health of the same runs (polarized gates, dead experts, mean gate entropy) per rate."""
    title = "Training with gate dropout: task metrics and gate health by rate"
    if df is None or not len(df):
        return no_data(title, "no training comparison yet: run one (gatewatch ablate RUN --train-compare 0,0.1,0.2)")
    panels = _task_frames(df, metric)
    health = [c for c in HEALTH if c in df.columns and df[c].notna().any()]
    fig, cols, n_rows = _grid(_panel_titles(panels) + [HEALTH[c] for c in health], cols=3)
    rates = sorted(df["rate"].unique())
    colour = {r: SERIES_COLOURS[i % len(SERIES_COLOURS)] for i, r in enumerate(rates)}
    runs = df.drop_duplicates(["rate", "seed"])
    items = [(name, rows, "value") for _, name, rows in panels] + [(HEALTH[c], runs, c) for c in health]
    for i, (y_title, rows, column) in enumerate(items):
        place = _place(i, cols)
        for rate in rates:
            sel = rows[rows["rate"] == rate]
            fig.add_trace(go.Box(
                x=[f"{rate:g}"] * len(sel), y=sel[column], name=f"rate {rate:g}", legendgroup=f"{rate:g}",
                showlegend=i == 0, boxpoints="all", jitter=0.3, pointpos=0, marker={"color": colour[rate]},
                customdata=sel["seed"], hovertemplate="seed %{customdata}: %{y:.4f}<extra></extra>",
            ), **place)
        fig.update_xaxes(title_text="gate dropout rate", type="category", **place)
        fig.update_yaxes(title_text=y_title, **place)
    return layout(fig, title=title, x=None, height=90 + 300 * n_rows, legend="gate dropout", hover="closest")


def removal_figure(summary: pd.DataFrame) -> go.Figure:
    """Task removal (the table of ``gatewatch.ablation.removal_summary``): one bar per (task left out, remaining
    task), the change of the remaining task's metric signed so that + = better without the other task, with
    two standard errors over seeds as error bars. Red: it hurts (negative transfer); blue: it helps."""
    title = "Each task without another (+ = better without it: negative transfer)"
    if not len(summary):
        return no_data(title, "no task-removal results yet")
    gain = [d if str(m).lower() in HIGHER_IS_BETTER else -d
            for d, m in zip(summary["delta"], summary["metric"], strict=True)]
    colours = {"hurts": "#B2182B", "helps": "#2166AC", "no clear effect": "#999"}
    labels = [f"{t} without {d}" for d, t in zip(summary["dropped"], summary["task"], strict=True)]
    errors = [2 * s if s == s else 0.0 for s in summary["se"]]
    fig = go.Figure(go.Bar(
        x=labels, y=gain, marker_color=[colours[v] for v in summary["verdict"]],
        error_y={"type": "data", "array": errors, "visible": True, "color": "#444"},
        customdata=list(zip(summary["sentence"], summary["seeds"], strict=True)),
        hovertemplate="%{customdata[0]}<br>%{customdata[1]} seed(s); bar: +-2 SE<extra></extra>", showlegend=False,
    ))
    fig.add_hline(y=0, line_color="#444", line_width=1)
    return layout(fig, title=title, x="remaining task, without the task left out",
                  y="metric change (+ = better), +-2 SE", height=380, hover="closest")
