"""Synthetic data (the MMoE paper's generator): final loss of shared-bottom, OMoE and MMoE as the task
correlation p drops from 1.0 to 0.9 to 0.5, over several seeds. The paper's finding: all three do about
as well at p = 1; as p drops, shared-bottom and OMoE degrade and MMoE degrades least.

    python scripts/experiments/synthetic_correlation.py               # 5 seeds x 3 models x 3 p, 3,000 steps
    python scripts/experiments/synthetic_correlation.py --seeds 1 --steps 300 --tag small   # quick check

"Final loss" is the test MSE averaged over the two tasks after the last step (the validation MSE is kept
every steps/10 steps, for the curves). Seed s draws data set s and initialises the models with s, so the
three models and three p share data and initial seeds; the data sets differ a lot in difficulty, so the
summary also gives each model's MSE relative to shared-bottom on the same data and p.
Writes docs/experiments/synthetic_correlation[_TAG].{csv,json,html,png}.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from common import job, parser, run_all, save_figure, settings, write_results
from plotly.subplots import make_subplots

from gatewatch.training import TrainConfig

CORRELATIONS = (1.0, 0.9, 0.5)
# the sizes the MMoE paper gives for this experiment: 8 single-layer experts of 16 units and single-layer towers
# of 8 units; the shared bottom is one layer of 113 units, for about the same number of parameters
MODELS = {
    "shared_bottom": {"bottom_hidden": [], "bottom_dim": 113, "tower_hidden": [8]},
    "omoe": {"n_experts": 8, "expert_hidden": [], "expert_dim": 16, "tower_hidden": [8]},
    "mmoe": {"n_experts": 8, "expert_hidden": [], "expert_dim": 16, "tower_hidden": [8]},
}
COLORS = ("#636efa", "#00cc96", "#ef553b")
DATA = {"n_train": 10_000, "n_val": 2_000, "n_test": 2_000, "dim": 100, "n_sin": 10, "scale": 1.0, "noise": 0.01}


def mean_mse(metrics: dict) -> float:
    """MSE averaged over the tasks of one evaluation ({task: {"mse": ...}}, other keys ignored)."""
    values = [m["mse"] for m in metrics.values() if isinstance(m, dict)]
    return sum(values) / len(values)


def summarise(rows: list[dict]) -> pd.DataFrame:
    """Per (p, model): test MSE over seeds (geometric and arithmetic mean, spread), the geometric mean of its
    ratio to shared-bottom's MSE on the same data (seed) and p, and in how many seeds it had the lowest MSE."""
    flat = pd.DataFrame([{k: r[k] for k in ("model", "p", "seed", "test_mse")} for r in rows])
    base = flat[flat["model"] == "shared_bottom"].set_index(["p", "seed"])["test_mse"]
    flat["log_ratio"] = np.log(flat["test_mse"].to_numpy() / base.loc[list(zip(flat["p"], flat["seed"], strict=True))]
                               .to_numpy())
    flat["best"] = flat.groupby(["p", "seed"])["test_mse"].transform("min") == flat["test_mse"]
    summary = flat.groupby(["p", "model"]).agg(
        geo_mean=("test_mse", lambda v: float(np.exp(np.log(v).mean()))), mean=("test_mse", "mean"),
        std=("test_mse", "std"), min=("test_mse", "min"), max=("test_mse", "max"),
        ratio_to_shared_bottom=("log_ratio", lambda v: float(np.exp(v.mean()))), best_in_seeds=("best", "sum"),
        seeds=("test_mse", "size"),
    ).reset_index()
    return summary.sort_values(["p", "model"], ascending=[False, True])


def figure(summary: pd.DataFrame, rows: list[dict], seeds: int, steps: int) -> go.Figure:
    """Left: final test MSE vs p (geometric mean over seeds); right: mean validation curves at the lowest p."""
    low = min(CORRELATIONS)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("final test MSE (geometric mean over seeds)",
                                                        f"validation MSE during training, p = {low}"))
    for model, color in zip(MODELS, COLORS, strict=True):
        part = summary[summary["model"] == model].sort_values("p")
        fig.add_scatter(x=part["p"], y=part["geo_mean"], name=model, legendgroup=model, line={"color": color},
                        mode="lines+markers", row=1, col=1)
        curves = [h for r in rows if r["model"] == model and r["p"] == low for h in r["history"]]
        curve = pd.DataFrame([{"step": h["step"], "mse": mean_mse(h)} for h in curves]).groupby("step")["mse"].mean()
        fig.add_scatter(x=curve.index, y=curve.values, name=model, legendgroup=model, showlegend=False, mode="lines",
                        line={"color": color}, row=1, col=2)
    fig.update_xaxes(title_text="task correlation p", row=1, col=1)
    fig.update_xaxes(title_text="step", row=1, col=2)
    fig.update_yaxes(title_text="test MSE (mean of 2 tasks)", type="log", row=1, col=1)
    fig.update_yaxes(title_text="validation MSE (mean of 2 tasks and seeds)", type="log", row=1, col=2)
    fig.update_layout(title=f"Synthetic data: {seeds} seeds per point, {steps} steps")
    return fig


def main() -> None:
    args = parser(__doc__.splitlines()[0], seeds=5, steps=3000).parse_args()
    jobs = [
        job({"model": model, "p": p, "seed": seed}, TrainConfig(
            model=model, model_kwargs=kwargs, data="synthetic", data_kwargs={**DATA, "correlation": p, "seed": seed},
            steps=args.steps, batch_size=256, lr=1e-3, seed=seed, watch=False, tensorboard=False,
            eval_every=max(1, args.steps // 10),
        ))
        for p in CORRELATIONS for model, kwargs in MODELS.items() for seed in range(args.seeds)
    ]
    rows = run_all(jobs, args.workers)
    for r in rows:
        r["test_mse"] = mean_mse(r["test"])
    summary = summarise(rows)
    stem = "synthetic_correlation" + (f"_{args.tag}" if args.tag else "")
    write_results(rows, args.out, stem, settings(args, models=MODELS, data=DATA, lr=1e-3, batch_size=256,
                                                  summary=summary.to_dict("records")))
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    save_figure(figure(summary, rows, args.seeds, args.steps), args.out, stem)


if __name__ == "__main__":
    main()
