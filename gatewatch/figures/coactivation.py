"""Co-activation of a router's experts: the E x E heatmap of P(j | i) in one full window of a layer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ._style import layout, nearest_step, no_data

NO_COACTIVATION = ("no co-activation in this run (routers that choose two experts or more per token write it; "
                   "GateWatch(coactivation=True) is the default)")


def conditional_matrix(coactivation: pd.DataFrame, gate: str, step: int, experts: int | None = None) -> np.ndarray:
    """``P(j | i)`` of ``gate`` in the full window at ``step``, ``[E, E]``: of the tokens that chose expert i (row),
    the share that also chose j (column); 1 on the diagonal, NaN on the rows of experts no token chose.
    ``experts``: E, when the last experts were never chosen."""
    rows = coactivation[(coactivation["gate"] == gate) & (coactivation["step"] == step)]
    seen = int(rows[["expert_a", "expert_b"]].to_numpy().max()) + 1 if len(rows) else 0
    e = max(seen, experts or 0)
    counts = np.zeros((e, e))
    counts[rows["expert_a"].to_numpy(), rows["expert_b"].to_numpy()] = rows["count"].to_numpy(dtype=float)
    counts = np.triu(counts) + np.triu(counts, 1).T
    chose = np.diag(counts).copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(chose[:, None] > 0, counts / np.where(chose > 0, chose, 1)[:, None], np.nan)


def coactivation_heatmap(coactivation: pd.DataFrame, gate: str, step: int | None = None, *,
                         experts: int | None = None, top_k: int | None = None) -> go.Figure:
    """Heatmap of P(j | i) for one layer in the full window nearest ``step`` (the last one when None); the colour
    scale is centred on an even random choice, (k - 1) / (E - 1), when ``top_k`` is given."""
    title = f"Co-activation P(j | i), {gate}"
    rows = coactivation[coactivation["gate"] == gate]
    if not len(rows):
        return no_data(title, NO_COACTIVATION)
    at = nearest_step(rows["step"], step)
    grid = conditional_matrix(rows, gate, int(at), experts)
    e = grid.shape[0]
    baseline = (top_k - 1) / (e - 1) if top_k and e > 1 else None
    shown = np.where(np.eye(e, dtype=bool), np.nan, grid)  # the diagonal (1) would squash the scale
    fig = go.Figure(go.Heatmap(
        z=shown, x=list(range(e)), y=list(range(e)), colorscale="Viridis", zmin=0,
        colorbar={"title": {"text": "P(j|i)"}},
        hovertemplate="of the tokens that chose %{y}, %{z:.3f} also chose %{x}<extra></extra>",
    ))
    note = f" (even random choice {baseline:.3f})" if baseline is not None else ""
    layout(fig, title=f"{title}, step {int(at):,}{note}", x="expert j (also chosen)", y="expert i",
           height=min(720, max(360, 120 + 4 * e)), hover="closest")
    fig.update_yaxes(autorange="reversed")
    return fig


__all__ = ["coactivation_heatmap", "conditional_matrix"]
