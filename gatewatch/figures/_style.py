"""What every figure shares: colours per expert / task / run, downsampling, layout, empty figures."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

MAX_POINTS = 2000  # points per line series; longer series are averaged in buckets of steps
MAX_COLUMNS = 400  # step columns of a heatmap
STEP_AXIS = "training step"

EXPERT_COLOURS = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#EECA3B", "#9D755D",
                  "#FF9DA6", "#BAB0AC"]
EXPERT_COLOURS_MANY = ["#AA0DFE", "#3283FE", "#85660D", "#782AB6", "#565656", "#1C8356", "#16FF32", "#F7E1A0",
                       "#E2E2E2", "#1CBE4F", "#C4451C", "#DEA0FD", "#FE00FA", "#325A9B", "#FEAF16", "#F8A19F",
                       "#90AD1C", "#F6222E", "#1CFFCE", "#2ED9FF", "#B10DA1", "#C075A6", "#FC1CBF", "#B00068",
                       "#FBE426", "#FA0087"]
SERIES_COLOURS = ["#1B9E77", "#D95F02", "#7570B3", "#E7298A", "#66A61E", "#E6AB02", "#A6761D", "#666666"]
CONFLICT_SCALE = "RdBu"  # red = the tasks' gradients point apart, blue = they agree


def natural_key(label: object) -> tuple:
    """Sort key that puts "2" before "10" and "layer0:2" before "layer0:10"."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", str(label)) if part)


def ordered(labels: Iterable[object]) -> list[str]:
    """Distinct labels in natural order."""
    return sorted({str(x) for x in labels if not pd.isna(x)}, key=natural_key)


def expert_colours(labels: Iterable[object]) -> dict[str, str]:
    """A fixed colour per expert label: the i-th expert in natural order always gets the i-th colour."""
    names = ordered(labels)
    palette = EXPERT_COLOURS if len(names) <= len(EXPERT_COLOURS) else EXPERT_COLOURS_MANY
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def series_colours(labels: Sequence[object]) -> dict[str, str]:
    """Colours for tasks, gates, task pairs or runs, in the order given."""
    return {str(name): SERIES_COLOURS[i % len(SERIES_COLOURS)] for i, name in enumerate(dict.fromkeys(labels))}


def step_buckets(steps: pd.Series, max_points: int) -> pd.Series:
    """For each row, the last step of its bucket, so that at most ``max_points`` distinct steps remain."""
    unique = np.unique(steps.to_numpy())
    if len(unique) <= max_points:
        return steps
    width = int(np.ceil(len(unique) / max_points))
    bucket_of = np.arange(len(unique)) // width
    last = pd.Series(unique).groupby(bucket_of).transform("max").to_numpy()
    return pd.Series(last[np.searchsorted(unique, steps.to_numpy())], index=steps.index)


def downsample(df: pd.DataFrame, by: Sequence[str], values: Sequence[str], max_points: int = MAX_POINTS
               ) -> pd.DataFrame:
    """Average ``values`` over buckets of steps per ``by`` group; unchanged when the series are short."""
    cols = ["step", *by, *values]
    if df["step"].nunique() <= max_points:
        return df[cols]
    df = df.assign(step=step_buckets(df["step"], max_points))
    return df.groupby(["step", *by], sort=False, observed=True)[list(values)].mean().reset_index()[cols]


def nearest_step(steps: Iterable[int], step: int | None) -> int | None:
    """The last available step at or before ``step`` (the first one when ``step`` is earlier; the last when None)."""
    available = np.unique(np.asarray(pd.Series(steps).dropna(), dtype=np.int64))
    if not len(available):
        return None
    if step is None:
        return int(available[-1])
    i = int(np.searchsorted(available, step, side="right")) - 1
    return int(available[max(i, 0)])


def gate_labels(gates: pd.DataFrame) -> dict[str, str]:
    """Legend label per gate: the task name when the gate is named after it, else ``gate (task)`` or ``gate``."""
    out: dict[str, str] = {}
    for gate, task in gates[["gate", "task"]].drop_duplicates("gate").itertuples(index=False):
        if pd.isna(task) or str(task) == str(gate):
            out[str(gate)] = str(gate)
        else:
            out[str(gate)] = f"{gate} (task {task})"
    return out


def layout(fig: go.Figure, *, title: str, x: str | None = STEP_AXIS, y: str | None = None, height: int = 420,
           legend: str | None = None, hover: str = "x unified") -> go.Figure:
    """Title, axis titles, legend title, white template and a compact margin."""
    fig.update_layout(
        title={"text": title, "x": 0, "xanchor": "left", "font": {"size": 16}}, template="plotly_white",
        height=height, margin={"l": 60, "r": 20, "t": 60, "b": 50}, hovermode=hover,
        legend={"title": {"text": legend}} if legend else {},
    )
    if x is not None:
        fig.update_xaxes(title_text=x)
    if y is not None:
        fig.update_yaxes(title_text=y)
    return fig


def no_data(title: str, message: str, height: int = 260) -> go.Figure:
    """A figure that says why there is nothing to draw."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 14, "color": "#555"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return layout(fig, title=title, x=None, height=height)
