"""Where the tasks fight: gradient cosine per task pair over training, per module and per parameter, the
Recon-style ranking of parameters, and the share of elements whose gradient signs disagree.

Input: the ``conflict`` table (one row per step x scope x name x task pair; ``scope`` is "all" for all shared
parameters together, "module" or "param").
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from ._style import (
    CONFLICT_SCALE,
    MAX_COLUMNS,
    MAX_POINTS,
    downsample,
    layout,
    natural_key,
    nearest_step,
    no_data,
    series_colours,
)

COSINE_AXIS = "gradient cosine between the tasks"
NO_CONFLICT = "no conflict data: run with GateWatch(conflict_every=50)"


def pair_label(a: object, b: object) -> str:
    return f"{a} ~ {b}"


def pairs(conflict: pd.DataFrame) -> list[str]:
    """Task pair labels, in the order they appear."""
    rows = conflict[conflict["scope"] == "all"]
    rows = (rows if len(rows) else conflict)[["task_a", "task_b"]].drop_duplicates()
    return [pair_label(a, b) for a, b in rows.itertuples(index=False)]


def pair_rows(conflict: pd.DataFrame, scope: str, pair: str | None = None) -> pd.DataFrame:
    """Rows of one scope (and task pair) with a measured cosine, with a ``pair`` label column."""
    rows = conflict[(conflict["scope"] == scope).to_numpy() & conflict["cosine"].notna().to_numpy()]
    if pair is not None:
        a, _, b = pair.partition(" ~ ")
        rows = rows[(rows["task_a"] == a).to_numpy() & (rows["task_b"] == b).to_numpy()]
        return rows.assign(pair=pair)
    return rows.assign(pair=rows["task_a"].astype(str) + " ~ " + rows["task_b"].astype(str))


def _conflict_band(fig: go.Figure) -> None:
    fig.add_hrect(y0=-1, y1=0, fillcolor="#E45756", opacity=0.06, line_width=0, layer="below",
                  annotation_text="conflict (cosine < 0)", annotation_position="bottom left",
                  annotation_font={"size": 11, "color": "#A33"})
    fig.add_hline(y=0, line_color="#999", line_width=1)
    fig.update_yaxes(range=[-1.02, 1.02])


def cosine_over_time(conflict: pd.DataFrame, *, scope: str = "all", pair: str | None = None,
                     max_points: int = MAX_POINTS) -> go.Figure:
    """Gradient cosine over training. ``scope="all"``: one line per task pair over all shared parameters;
    ``scope="module"`` (or ``"param"``): one line per module of the task pair ``pair`` (all pairs if None)."""
    what = "all shared parameters" if scope == "all" else f"each {scope}" + (f", {pair}" if pair else "")
    title = f"Gradient cosine between tasks over training ({what})"
    rows = pair_rows(conflict, scope, pair)
    if not len(rows):
        return no_data(title, NO_CONFLICT if not len(conflict) else f"no {scope!r} rows for this task pair")
    series = "pair" if scope == "all" else "name"
    by = ["pair"] if scope == "all" else ["pair", "name"]
    rows = downsample(rows, by, ["cosine"], max_points)
    names = sorted(rows[series].unique(), key=natural_key) if series == "name" else list(dict.fromkeys(rows[series]))
    colours = series_colours(names)
    fig = go.Figure()
    for (key, p), s in rows.groupby([series, "pair"], sort=False):
        label = key if series == "pair" or pair is not None else f"{key} ({p})"
        fig.add_trace(go.Scatter(x=s["step"], y=s["cosine"], name=label, mode="lines",
                                 line={"color": colours[key], "width": 1.5},
                                 hovertemplate=f"{label}: %{{y:.3f}}<extra></extra>"))
    _conflict_band(fig)
    fig.update_layout(showlegend=True)  # name the pair even when it is the only one
    return layout(fig, title=title, y=COSINE_AXIS, legend="task pair" if series == "pair" else scope)


def cosine_heatmap(conflict: pd.DataFrame, pair: str, *, scope: str = "param", max_columns: int = MAX_COLUMNS
                   ) -> go.Figure:
    """Parameter (or module) x step heatmap of the cosine for one task pair: red = the tasks pull apart."""
    title = f"Gradient cosine per {scope} over training ({pair})"
    rows = pair_rows(conflict, scope, pair)
    if not len(rows):
        return no_data(title, NO_CONFLICT if not len(conflict) else f"no {scope!r} rows for {pair}")
    rows = downsample(rows, ["name"], ["cosine"], max_columns)
    grid = rows.pivot_table(index="name", columns="step", values="cosine", aggfunc="mean")
    grid = grid.loc[sorted(grid.index, key=natural_key)]
    fig = go.Figure(go.Heatmap(
        z=grid.to_numpy(), x=grid.columns, y=list(grid.index), zmin=-1, zmax=1, zmid=0, colorscale=CONFLICT_SCALE,
        colorbar={"title": {"text": "cosine"}}, hovertemplate="step %{x}<br>%{y}: cosine %{z:.3f}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed")
    return layout(fig, title=title, y=scope, height=max(300, 100 + 22 * len(grid)), hover="closest")


def conflict_counts(conflict: pd.DataFrame, *, pair: str | None = None, scope: str = "param") -> pd.DataFrame:
    """Recon-style count per parameter: steps whose cosine fell below the sampler's threshold (the ``below``
    running count at the last step; counted from ``cosine < 0`` where it is missing), with the measured steps.
    Summed over task pairs when ``pair`` is None; most conflicted first."""
    rows = pair_rows(conflict, scope, pair)
    if not len(rows):
        return pd.DataFrame(columns=["name", "count", "measured", "share", "mean_cosine"])
    grouped = rows.assign(negative=rows["cosine"] < 0).sort_values("step").groupby(["name", "pair"], sort=False)
    per_pair = grouped.agg(last_below=("below", "last"), negatives=("negative", "sum"),
                           measured=("cosine", "size"), mean_cosine=("cosine", "mean")).reset_index()
    per_pair["count"] = per_pair["last_below"].fillna(per_pair["negatives"]).astype(float)
    out = per_pair.groupby("name").agg(count=("count", "sum"), measured=("measured", "sum"),
                                       mean_cosine=("mean_cosine", "mean")).reset_index()
    out["share"] = out["count"] / out["measured"]
    return out.sort_values(["count", "mean_cosine"], ascending=[False, True]).reset_index(drop=True)


def conflict_ranking(conflict: pd.DataFrame, *, pair: str | None = None, scope: str = "param", top: int = 20
                     ) -> go.Figure:
    """Horizontal bars: the ``top`` parameters where the tasks fight most (Recon-style count of conflicting steps)."""
    who = pair or "all task pairs"
    title = f"Where the tasks fight most: steps in conflict per {scope} ({who})"
    counts = conflict_counts(conflict, pair=pair, scope=scope)
    if not len(counts):
        return no_data(title, NO_CONFLICT if not len(conflict) else f"no {scope!r} rows for {who}")
    counts = counts.head(top).iloc[::-1]
    fig = go.Figure(go.Bar(
        x=counts["count"], y=counts["name"], orientation="h", marker_color="#E45756",
        customdata=counts[["measured", "share", "mean_cosine"]].to_numpy(),
        hovertemplate="%{y}<br>%{x:.0f} conflicting of %{customdata[0]:.0f} measured steps "
                      "(%{customdata[1]:.0%})<br>mean cosine %{customdata[2]:.3f}<extra></extra>",
        showlegend=False,
    ))
    return layout(fig, title=title, x="measured steps with cosine below the threshold", y=scope,
                  height=max(300, 100 + 24 * len(counts)), hover="closest")


def sign_conflict_over_time(conflict: pd.DataFrame, *, scope: str = "all", max_points: int = MAX_POINTS
                            ) -> go.Figure:
    """Share of gradient elements whose signs differ between the two tasks, one line per task pair."""
    title = "Sign conflict over training (all shared parameters)" if scope == "all" else \
        f"Sign conflict over training (mean over {scope}s)"
    rows = pair_rows(conflict, scope)
    rows = rows[rows["sign_conflict"].notna()]
    if not len(rows):
        return no_data(title, NO_CONFLICT if not len(conflict) else f"no {scope!r} rows")
    rows = downsample(rows, ["pair"], ["sign_conflict"], max_points)
    colours = series_colours(list(dict.fromkeys(rows["pair"])))
    fig = go.Figure()
    for p, s in rows.groupby("pair", sort=False):
        fig.add_trace(go.Scatter(x=s["step"], y=s["sign_conflict"], name=p, mode="lines",
                                 line={"color": colours[p], "width": 1.5},
                                 hovertemplate=f"{p}: %{{y:.1%}}<extra></extra>"))
    fig.add_hline(y=0.5, line_dash="dash", line_color="#888", annotation_text="unrelated gradients (50%)",
                  annotation_position="top left")
    fig.update_yaxes(range=[0, 1], tickformat=".0%")
    fig.update_layout(showlegend=True)
    return layout(fig, title=title, y="elements with opposite signs", legend="task pair", height=360)


def purity_distribution(purity: pd.DataFrame, step: int | None = None, *, scope: str = "all") -> go.Figure:
    """GradDrop's sign purity P = (1 + sum g / sum |g|) / 2 of the shared gradient elements at one conflict step:
    mass near 0.5 means the tasks cancel each other, near 0 or 1 that they agree in sign."""
    rows = purity[purity["scope"] == scope]
    at = nearest_step(rows["step"], step)
    title = "Sign purity of the summed task gradients" + (f" at step {at}" if at is not None else "")
    if at is None:
        return no_data(title, NO_CONFLICT if not len(purity) else f"no {scope!r} purity rows")
    rows = rows[rows["step"] == at].assign(name=lambda d: d["name"].astype(str))
    names = sorted(rows["name"].unique(), key=natural_key)
    colours = series_colours(names)
    fig = go.Figure()
    for name in names:
        s = rows[rows["name"] == name].sort_values("bin")
        total = s["count"].sum()
        fig.add_trace(go.Bar(
            x=(s["lo"] + s["hi"]) / 2, y=s["count"] / total if total > 0 else s["count"] * float("nan"),
            width=(s["hi"] - s["lo"]) * 0.9 / len(names), name=name, marker_color=colours[name],
            hovertemplate=f"{name}: P in [%{{x:.2f}}]: %{{y:.1%}}<extra></extra>",
        ))
    fig.add_vline(x=0.5, line_dash="dash", line_color="#888", annotation_text="tasks cancel",
                  annotation_position="top")
    fig.update_layout(barmode="group")
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(tickformat=".0%")
    return layout(fig, title=title, x="sign purity P (0 or 1: the tasks agree in sign)", y="share of elements",
                  legend=scope, height=360, hover="closest")


__all__ = ["NO_CONFLICT", "conflict_counts", "conflict_ranking", "cosine_heatmap", "cosine_over_time", "pairs",
           "purity_distribution", "sign_conflict_over_time"]
