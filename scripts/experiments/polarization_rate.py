"""YouTube's observation (Zhao et al., RecSys 2019): about 20% of runs end with polarized gates, and 10% gate
dropout removes it. Across N seeds, the share of runs in which gatewatch's own ``polarization`` finding fires
(a task's mean gate puts >= 90% on one expert), without and with 10% gate dropout, in a few settings.

    python scripts/experiments/polarization_rate.py                          # 10 seeds x 2 x 3 settings, 1,500 steps
    python scripts/experiments/polarization_rate.py --seeds 2 --steps 300 --tag small   # quick check

Writes docs/experiments/polarization_rate[_TAG].{csv,json,html,png}.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from common import job, parser, run_all, save_figure, settings, write_results

from gatewatch.training import TrainConfig

GATE_DROPOUT = (0.0, 0.1)
# name -> (data, data kwargs, MMoE kwargs, learning rate)
SETTINGS = {
    "synthetic p=0.5, 8 experts, lr 1e-3": ("synthetic", {"correlation": 0.5}, {"n_experts": 8}, 1e-3),
    "census, 8 experts, lr 1e-3": ("census", {}, {"n_experts": 8}, 1e-3),
    "census, 4 experts, lr 1e-2": ("census", {}, {"n_experts": 4}, 1e-2),
}


def main() -> None:
    args = parser(__doc__.splitlines()[0], seeds=10, steps=1500).parse_args()
    jobs = [
        job({"setting": name, "gate_dropout": p, "seed": seed}, TrainConfig(
            model="mmoe", model_kwargs=kwargs, data=data, data_kwargs=data_kwargs, steps=args.steps, batch_size=256,
            lr=lr, seed=seed, gate_dropout=p, tensorboard=False, every=50, flush_every=500,
        ))
        for name, (data, data_kwargs, kwargs, lr) in SETTINGS.items() for p in GATE_DROPOUT
        for seed in range(args.seeds)
    ]
    rows = run_all(jobs, args.workers)
    for r in rows:
        r["polarized"] = "polarization" in r["findings"]
        r["largest_mean_share"] = max(r["top_share"].values())
    flat = pd.DataFrame([{k: r[k] for k in ("setting", "gate_dropout", "seed", "polarized", "largest_mean_share")}
                         | {code: code in r["findings"] for code in ("sharp_routing", "dead_expert", "collapse")}
                         for r in rows])
    summary = flat.groupby(["setting", "gate_dropout"], sort=False).agg(
        runs=("polarized", "size"), polarized=("polarized", "sum"), rate=("polarized", "mean"),
        sharp_routing=("sharp_routing", "mean"), dead_expert=("dead_expert", "mean"), collapse=("collapse", "mean"),
        largest_mean_share=("largest_mean_share", "mean"),
    ).reset_index()
    stem = "polarization_rate" + (f"_{args.tag}" if args.tag else "")
    write_results(rows, args.out, stem, settings(args, settings={k: list(v) for k, v in SETTINGS.items()},
                                                  summary=summary.to_dict("records")))
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    fig = go.Figure()
    for p in GATE_DROPOUT:
        part = summary[summary["gate_dropout"] == p]
        fig.add_bar(name=f"gate dropout {p:.0%}", x=part["setting"], y=part["rate"],
                    text=[f"{k} of {n}" for k, n in zip(part["polarized"], part["runs"], strict=True)])
    title = f"Share of runs whose gates polarize (gatewatch's polarization finding), {args.steps} steps"
    fig.update_layout(title=title, barmode="group", yaxis={"title": "share of runs", "range": [0, 1]})
    save_figure(fig, args.out, stem)


if __name__ == "__main__":
    main()
