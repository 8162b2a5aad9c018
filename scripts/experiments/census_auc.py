"""Census-income: test AUC of MMoE and shared-bottom for income and marital status, over several seeds,
next to the MMoE paper (Ma et al., KDD 2018, table 3: MMoE 0.9359 / 0.9927, shared-bottom 0.9295 / 0.9921).

    python scripts/experiments/census_auc.py                 # 3 seeds x 2 models, 2,000 steps each
    python scripts/experiments/census_auc.py --seeds 2 --steps 300 --tag small   # a quick check

Writes docs/experiments/census_auc[_TAG].{csv,json,html,png}. Downloads the data once (pip, see
gatewatch.data.load_census).
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from common import job, parser, run_all, save_figure, settings, write_results

from gatewatch.training import TrainConfig

PAPER = {  # test AUC, MMoE paper table 3 (census-income, income + marital status)
    "mmoe": {"income": 0.9359, "marital": 0.9927},
    "shared_bottom": {"income": 0.9295, "marital": 0.9921},
}
# about the same number of parameters (~275k): 8 experts 503-64-32 vs one 503-512-32 bottom
MODELS = {
    "mmoe": {"n_experts": 8, "expert_hidden": [64], "expert_dim": 32, "tower_hidden": [16]},
    "shared_bottom": {"bottom_hidden": [512], "bottom_dim": 32, "tower_hidden": [16]},
}


def figure(summary: pd.DataFrame, seeds: int) -> go.Figure:
    """Our mean test AUC (dots, +- std) next to the paper's (diamonds), one pair per task and model."""
    x = [f"{t}<br>{m}" for t, m in zip(summary["task"], summary["model"], strict=True)]
    fig = go.Figure()
    fig.add_scatter(name=f"ours (mean +- std of {seeds} seeds)", x=x, y=summary["mean"], mode="markers",
                    marker={"size": 12}, error_y={"type": "data", "array": summary["std"].fillna(0).tolist()})
    fig.add_scatter(name="MMoE paper", x=x, y=summary["paper"], mode="markers",
                    marker={"symbol": "diamond", "size": 14})
    fig.update_layout(title="Census-income test AUC: ours vs the MMoE paper", yaxis={"title": "test AUC"})
    return fig


def main() -> None:
    args = parser(__doc__.splitlines()[0], seeds=3, steps=2000).parse_args()
    jobs = [
        job({"model": model, "seed": seed}, TrainConfig(
            model=model, model_kwargs=kwargs, data="census", steps=args.steps, batch_size=256, lr=1e-3,
            seed=seed, watch=model != "shared_bottom", tensorboard=False, every=50, flush_every=500,
        ))
        for model, kwargs in MODELS.items() for seed in range(args.seeds)
    ]
    rows = run_all(jobs, args.workers)
    flat = pd.DataFrame([{"model": r["model"], "seed": r["seed"], "task": task, "test_auc": m["auc"],
                          "val_auc": r["val"][task]["auc"]} for r in rows for task, m in r["test"].items()])
    summary = flat.groupby(["model", "task"])["test_auc"].agg(["mean", "std", "min", "max", "count"]).reset_index()
    summary["paper"] = [PAPER[m][t] for m, t in zip(summary["model"], summary["task"], strict=True)]
    stem = "census_auc" + (f"_{args.tag}" if args.tag else "")
    write_results(rows, args.out, stem, settings(args, models=MODELS, lr=1e-3, batch_size=256, paper=PAPER,
                                                  summary=summary.to_dict("records")))
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    save_figure(figure(summary, args.seeds), args.out, stem)


if __name__ == "__main__":
    main()
