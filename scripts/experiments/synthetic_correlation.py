"""Synthetic data (the MMoE paper's generator): final loss of shared-bottom, OMoE and MMoE as the task
correlation p drops from 1.0 to 0.9 to 0.5, over several seeds. The paper's finding: all three do about
as well at p = 1; as p drops, shared-bottom and OMoE degrade and MMoE degrades least.

    python scripts/experiments/synthetic_correlation.py               # 3 seeds x 3 models x 3 p, 2,000 steps
    python scripts/experiments/synthetic_correlation.py --seeds 1 --steps 300 --tag small   # quick check

"Final loss" is the test MSE averaged over the two tasks after the last step (also the validation MSE
every 300 steps, for the curves). Writes docs/experiments/synthetic_correlation[_TAG].{csv,json,html,png}.
"""

from __future__ import annotations

import pandas as pd
from common import job, parser, run_all, save_figure, settings, write_results
from plotly.subplots import make_subplots

from gatewatch.training import TrainConfig

CORRELATIONS = (1.0, 0.9, 0.5)
# about the same number of parameters (~70k): 8 experts 100-64-32 vs one 100-512-32 bottom
MODELS = {
    "shared_bottom": {"bottom_hidden": [512], "bottom_dim": 32, "tower_hidden": [16]},
    "omoe": {"n_experts": 8, "expert_hidden": [64], "expert_dim": 32, "tower_hidden": [16]},
    "mmoe": {"n_experts": 8, "expert_hidden": [64], "expert_dim": 32, "tower_hidden": [16]},
}
DATA = {"n_train": 10_000, "n_val": 2_000, "n_test": 2_000, "dim": 100, "n_sin": 10, "scale": 1.0, "noise": 0.01}


def mean_mse(metrics: dict) -> float:
    """MSE averaged over the tasks of one evaluation ({task: {"mse": ...}}, other keys ignored)."""
    values = [m["mse"] for m in metrics.values() if isinstance(m, dict)]
    return sum(values) / len(values)


def main() -> None:
    args = parser(__doc__.splitlines()[0], seeds=3, steps=2000).parse_args()
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
    flat = pd.DataFrame([{k: r[k] for k in ("model", "p", "seed", "test_mse")} for r in rows])
    summary = flat.groupby(["p", "model"])["test_mse"].agg(["mean", "std", "min", "max", "count"]).reset_index()
    stem = "synthetic_correlation" + (f"_{args.tag}" if args.tag else "")
    write_results(rows, args.out, stem, settings(args, models=MODELS, data=DATA, lr=1e-3, batch_size=256,
                                                  summary=summary.to_dict("records")))
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    fig = make_subplots(rows=1, cols=2, subplot_titles=("final test MSE vs task correlation",
                                                        "validation MSE during training, p = 0.5"))
    for model in MODELS:
        part = summary[summary["model"] == model].sort_values("p")
        fig.add_scatter(x=part["p"], y=part["mean"], name=model, legendgroup=model, mode="lines+markers",
                        error_y={"type": "data", "array": part["std"].fillna(0).tolist()}, row=1, col=1)
        curves = [r for r in rows if r["model"] == model and r["p"] == min(CORRELATIONS)]
        history = pd.DataFrame([{"step": h["step"], "mse": mean_mse(h)} for c in curves for h in c["history"]])
        curve = history.groupby("step")["mse"].mean()
        fig.add_scatter(x=curve.index, y=curve.values, name=model, legendgroup=model, showlegend=False, mode="lines",
                        row=1, col=2)
    fig.update_xaxes(title_text="task correlation p", row=1, col=1)
    fig.update_xaxes(title_text="step", row=1, col=2)
    fig.update_yaxes(title_text="MSE (mean of 2 tasks)", type="log")
    fig.update_layout(title=f"Synthetic data: {args.seeds} seeds per point, {args.steps} steps")
    save_figure(fig, args.out, stem)


if __name__ == "__main__":
    main()
