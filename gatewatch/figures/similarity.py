"""How alike the experts of a pool are: the E x E linear-CKA matrix over training, and its trend."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ._style import SERIES_COLOURS, STEP_AXIS, layout, natural_key, no_data, ordered

MAX_FRAMES = 24  # measured steps reachable from the matrix's slider (evenly spaced, the last one always)
SIMILARITY_SCALE = "Blues"


def pool_rows(similarity: pd.DataFrame, pool: str | None) -> pd.DataFrame:
    """The rows of ``pool`` (the first pool in natural order when None)."""
    pools = ordered(similarity["pool"])
    if not pools:
        return similarity.iloc[0:0]
    return similarity[similarity["pool"] == (pool if pool is not None else pools[0])]


def matrix_at(rows: pd.DataFrame, experts: list[str], column: str = "cka") -> np.ndarray:
    """The symmetric E x E matrix of ``column`` from one step's pair rows (1 on the diagonal, NaN where a pair has
    no row)."""
    index = {e: i for i, e in enumerate(experts)}
    grid = np.full((len(experts), len(experts)), np.nan)  # pairs not measured stay blank
    np.fill_diagonal(grid, 1.0)
    for a, b, value in rows[["expert_a", "expert_b", column]].itertuples(index=False):
        grid[index[str(a)], index[str(b)]] = grid[index[str(b)], index[str(a)]] = value
    return grid


def similarity_matrix(similarity: pd.DataFrame, pool: str | None = None, *, threshold: float | None = None,
                      max_frames: int = MAX_FRAMES) -> go.Figure:
    """Heatmap of the linear CKA of every expert pair, with a slider over the measured steps that wrote every pair
    (the last one shown); pairs at or above ``threshold`` are outlined in the hover text."""
    rows = pool_rows(similarity, pool)
    title = "Linear CKA between experts" + (f" ({rows['pool'].iloc[0]})" if len(rows) else "")
    if not len(rows):
        return no_data(title, "no expert similarity written yet (GateWatch(similarity_every=...))")
    experts = sorted({str(e) for e in (*rows["expert_a"], *rows["expert_b"])}, key=natural_key)
    labels = [f"expert {e}" for e in experts]
    written = rows.groupby("step").size()
    steps = sorted(written[written == written.max()].index)  # full measurements (not the top pairs in between)
    if len(steps) > max_frames:
        steps = sorted({steps[i] for i in np.linspace(0, len(steps) - 1, max_frames).round().astype(int)})
    grids = {s: matrix_at(rows[rows["step"] == s], experts) for s in steps}
    text = len(experts) <= 12
    mark = f" (>= {threshold:g}: redundant)" if threshold is not None else ""
    fig = go.Figure(go.Heatmap(
        z=grids[steps[-1]], x=labels, y=labels, zmin=0, zmax=1, colorscale=SIMILARITY_SCALE,
        colorbar={"title": {"text": "CKA"}}, texttemplate="%{z:.2f}" if text else None,
        hovertemplate=f"%{{y}} vs %{{x}}: CKA %{{z:.3f}}{mark}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(sliders=[{
        "active": len(steps) - 1, "currentvalue": {"prefix": "step "}, "pad": {"t": 40},
        "steps": [{"label": str(s), "method": "restyle", "args": [{"z": [grids[s]]}]} for s in steps],
    }])
    size = 160 + 44 * len(experts)
    return layout(fig, title=title, x=None, height=size + 110, hover="closest")


def similarity_over_time(similarity: pd.DataFrame, pool: str | None = None, *, threshold: float | None = None,
                         top: int = 3, summary: pd.DataFrame | None = None) -> go.Figure:
    """Mean and largest CKA over the pool's expert pairs at each measured step (from ``summary``, the
    ``similarity_summary`` table, where it has the pool: the pairs written may be the most similar ones only),
    the ``top`` most similar pairs of the last step, and the ``redundant_cka`` line."""
    rows = pool_rows(similarity, pool).dropna(subset=["cka"])
    title = "Expert similarity over training" + (f" ({rows['pool'].iloc[0]})" if len(rows) else "")
    if not len(rows):
        return no_data(title, "no expert similarity written yet (GateWatch(similarity_every=...))")
    rows = rows.assign(pair=rows["expert_a"].astype(str) + " ~ " + rows["expert_b"].astype(str))
    whole = summary[summary["pool"] == rows["pool"].iloc[0]] if summary is not None else None
    if whole is not None and len(whole):
        per_step = whole.set_index("step")[["mean_cka", "max_cka"]].set_axis(["mean", "max"], axis=1).sort_index()
    else:
        per_step = rows.groupby("step")["cka"].agg(["mean", "max"])
    last = rows[rows["step"] == rows["step"].max()].nlargest(top, "cka")["pair"].tolist()
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=per_step.index, y=per_step["max"], name="largest pair", mode="lines",
                             line={"color": "#333", "width": 2}, hovertemplate="largest: %{y:.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=per_step.index, y=per_step["mean"], name="mean over pairs", mode="lines",
                             line={"color": "#888", "width": 2, "dash": "dash"},
                             hovertemplate="mean: %{y:.3f}<extra></extra>"))
    for pair, colour in zip(last, SERIES_COLOURS, strict=False):
        s = rows[rows["pair"] == pair].sort_values("step")
        fig.add_trace(go.Scatter(x=s["step"], y=s["cka"], name=f"experts {pair}", mode="lines",
                                 line={"color": colour, "width": 1.4},
                                 hovertemplate=f"{pair}: %{{y:.3f}}<extra></extra>"))
    if threshold is not None:
        fig.add_hline(y=threshold, line_dash="dot", line_color="#C44", annotation_text=f"redundant ({threshold:g})",
                      annotation_position="top left")
    fig.update_yaxes(range=[0, 1.02])
    return layout(fig, title=title, x=STEP_AXIS, y="linear CKA", legend="expert pairs", height=380)


__all__ = ["similarity_matrix", "similarity_over_time"]
