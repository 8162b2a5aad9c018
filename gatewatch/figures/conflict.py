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
    expert_colours,
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




CONTESTED_FILL = "rgba(214, 39, 40, 0.10)"
MAX_FRAMES = 60  # conflict steps the slider can show; longer runs keep evenly spaced steps and the last


def expert_conflict_map(table: pd.DataFrame, pair: str | None = None, *, contested_share: float = 0.2,
                        threshold: float = 0.0, mode: str | None = None) -> go.Figure:
    """Conflict x routing for one task pair: each expert a point, its gradient cosine against the smaller of the
    two tasks' gate shares on it, for one ``mode`` (``"exact"`` by default when the run has it, else ``"proxy"``).
    The shaded corner (both shares >= ``contested_share``, cosine below
    ``threshold``) is where the pair fights over an expert both use. A slider steps through the conflict steps.

    ``table``: rows of :func:`gatewatch.quantities.conflict.read.expert_table` (step, window_step, mode, expert,
    module, task_a, task_b, cosine, below, measured, share_a, share_b, zero_grad)."""
    title = "Do the tasks that fight share experts?"
    if not len(table):
        return no_data(title, "no per-expert conflict: run with GateWatch(conflict_every=...) on a model whose gates "
                              "mix expert modules (see docs/conflict.md)")
    modes = list(dict.fromkeys(table["mode"]))
    table = table[table["mode"] == (mode if mode in modes else ("exact" if "exact" in modes else modes[0]))]
    labels = [pair_label(a, b) for a, b in table[["task_a", "task_b"]].itertuples(index=False)]
    pair = pair if pair in set(labels) else labels[0]
    rows = table[[lab == pair for lab in labels]].assign(used=lambda d: d[["share_a", "share_b"]].min(axis=1))
    a, b = rows["task_a"].iloc[0], rows["task_b"].iloc[0]
    mode = str(rows["mode"].iloc[0])
    steps = sorted(rows["step"].unique())
    if len(steps) > MAX_FRAMES:
        keep = {steps[round(i * (len(steps) - 1) / (MAX_FRAMES - 1))] for i in range(MAX_FRAMES)}
        steps = [s for s in steps if s in keep]
    colours = expert_colours(rows["expert"])

    def traces(step: int) -> list[go.Scatter]:
        now = rows[rows["step"] == step].sort_values("expert", key=lambda s: s.map(natural_key))
        return [go.Scatter(
            x=now["used"], y=now["cosine"], mode="markers+text", text=now["expert"], textposition="middle right",
            marker={"size": 14, "color": [colours[str(e)] for e in now["expert"]], "line": {"width": 1,
                                                                                          "color": "#333"}},
            customdata=now[["module", "share_a", "share_b", "below", "measured", "window_step"]].to_numpy(),
            hovertemplate=(f"expert %{{text}} (%{{customdata[0]}})<br>cosine %{{y:.2f}} ({mode})<br>share {a} "
                           f"%{{customdata[1]:.0%}}, {b} %{{customdata[2]:.0%}} (window %{{customdata[5]}})<br>below "
                           "threshold in %{customdata[3]} of %{customdata[4]} measured steps<extra></extra>"),
            showlegend=False,
        )]

    fig = go.Figure(data=traces(steps[-1]), frames=[go.Frame(data=traces(s), name=str(s)) for s in steps])
    fig.add_shape(type="rect", x0=contested_share, x1=1.0, y0=-1.0, y1=threshold, fillcolor=CONTESTED_FILL,
                  line={"width": 0}, layer="below")
    fig.add_annotation(x=1.0, y=-1.0, xanchor="right", yanchor="bottom", showarrow=False,
                       text="contested: both tasks use it, their gradients point apart",
                       font={"size": 12, "color": "#B22222"})
    fig.add_hline(y=threshold, line={"dash": "dot", "color": "#888", "width": 1})
    fig.update_xaxes(range=[-0.02, 1.02], tickformat=".0%")
    fig.update_yaxes(range=[-1.05, 1.05])
    fig.update_layout(sliders=[{
        "active": len(steps) - 1, "currentvalue": {"prefix": "conflict step "}, "pad": {"t": 40},
        "steps": [{"label": str(s), "method": "animate",
                   "args": [[str(s)], {"mode": "immediate", "frame": {"duration": 0, "redraw": True},
                                       "transition": {"duration": 0}}]} for s in steps],
    }])
    layout(fig, title=f"{title} {pair} ({mode})", x=f"how much both use the expert: min(share {a}, share {b})",
           y=f"gradient cosine on the expert ({mode})", height=520, hover="closest")
    fig.update_layout(margin={"l": 60, "r": 20, "t": 60, "b": 120})
    return fig


__all__ = ["NO_CONFLICT", "conflict_counts", "conflict_ranking", "cosine_heatmap", "cosine_over_time",
           "expert_conflict_map", "pairs", "purity_distribution", "sign_conflict_over_time"]
