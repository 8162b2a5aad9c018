"""Do MMoE's gates route conflicting tasks apart, do its experts learn different things, and does measured
gradient conflict predict the benefit of removing a task? MMoE against OMoE (one shared gate) on census-income
and on the MMoE paper's synthetic data at task correlations 1.0, 0.5 and 0.0.

    python scripts/experiments/conflict_and_transfer.py                # 5 seeds, 1,000 (census) / 2,000 steps
    python scripts/experiments/conflict_and_transfer.py --seeds 1 --steps 200 --tag small   # quick check

Each (data, model, seed) trains three times with the same seed and budget: the full model, watched with exact
conflict every 10 steps and expert similarity every 50 steps; and once without each task (its loss weight 0,
nothing else changed), unwatched. Per full run, over the second half of training:

* per expert module: the two tasks' gradient cosine on its parameters (mean over measured steps) and the
  smaller of the two tasks' mean gate shares on it ("shared use"). OMoE's single gate gives both tasks the
  same share by construction;
* the tasks' cosine over every shared parameter, and the share of measured steps below the run's
  ``conflict_threshold`` (Recon's count);
* linear CKA between every pair of experts at the last measured step (mean and largest pair).

Task removal: the remaining task's test metric without the other task minus with it, signed so that positive
means removing the other task helped (AUC up, MSE down): positive is negative transfer. The summary gives
means and standard deviations over seeds, and the Spearman correlation between a run's conflict cosine and
the removal benefit over every (data, model, seed, task).
Writes docs/experiments/conflict_and_transfer[_TAG].{csv,json,html,png} and ``_summary.csv``.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from common import job, parser, run_all, run_job, save_figure, settings, write_results
from plotly.subplots import make_subplots

import gatewatch as gw
from gatewatch.metric_direction import harm, primary_metric
from gatewatch.training import TrainConfig

DATA: dict[str, tuple[str, dict[str, Any]]] = {
    "census": ("census", {}),
    **{f"synthetic p={p}": ("synthetic", {"correlation": p, "n_train": 10_000, "n_val": 2_000, "n_test": 2_000})
       for p in (1.0, 0.5, 0.0)},
}
MODELS = {"mmoe": {"n_experts": 4}, "omoe": {"n_experts": 4}}
CONFLICT_EVERY = 10


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman's rank correlation (Pearson's on the ranks)."""
    return float(a.rank().corr(b.rank()))


def steps_for(data: str, steps: int) -> int:
    """Census runs ``steps``; the synthetic runs (a smaller problem that learns slower per step) twice that."""
    return steps if data == "census" else 2 * steps


def half(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the second half of training (by step)."""
    return table[table["step"] > table["step"].max() / 2] if len(table) else table


def expert_rows(run: gw.Run, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per expert module: the tasks' mean cosine on it and each task's mean gate share, second half."""
    conflict = half(run.table("conflict"))
    shares = half(run.shares)
    owner = {g["name"]: g.get("task") for g in run.meta.get("gates", [])}
    tasks = list(run.tasks)
    out = []
    for entry in report["expert_conflict"]:
        module = entry["module"]
        cos = conflict[(conflict["scope"] == "module") & (conflict["name"] == module)]["cosine"]
        mine = shares[shares["expert_name"] == entry["expert"]]
        share = {t: float(mine[mine["gate"].map(lambda g, t=t: owner.get(g) in (t, None))]["share"].mean())
                 for t in tasks}
        out.append({"module": module, "cosine": float(cos.mean()) if len(cos) else math.nan,
                    "shared_use": min(share.values()), **{f"share_{t}": v for t, v in share.items()}})
    return out


def watched_summary(run_dir: Path) -> dict[str, Any]:
    """What a full run measured (see the module docstring)."""
    run = gw.load_run(run_dir)
    report = gw.build_report(run)
    conflict = half(run.table("conflict"))
    total = conflict[conflict["scope"] == "all"]
    threshold = float(run.meta.get("conflict_threshold", 0.0))
    sim = run.table("similarity")
    last = sim[sim["step"] == sim["step"].max()] if len(sim) else sim
    return {"experts": expert_rows(run, report), "cosine_all": float(total["cosine"].mean()),
            "below_share": float((total["cosine"] < threshold).mean()),
            "cka_mean": float(last["cka"].mean()) if len(last) else math.nan,
            "cka_max": float(last["cka"].max()) if len(last) else math.nan,
            "findings": sorted({f["code"] for f in report["findings"]})}


def jobs_for(seeds: int, steps: int) -> list[dict[str, Any]]:
    """Full and task-removal runs of every (data, model, seed)."""
    out = []
    for name, (data, data_kwargs) in DATA.items():
        tasks = ["income", "marital"] if data == "census" else ["t1", "t2"]
        for model, kwargs in MODELS.items():
            for seed in range(seeds):
                base = {"model": model, "model_kwargs": kwargs, "data": data, "seed": seed, "lr": 1e-3,
                        "data_kwargs": {**data_kwargs, "seed": seed} if data == "synthetic" else {},
                        "steps": steps_for(name, steps), "batch_size": 256, "tensorboard": False}
                out.append(job({"data": name, "model": model, "seed": seed, "without": None}, TrainConfig(
                    **base, every=50, flush_every=500, conflict_every=CONFLICT_EVERY)))
                out += [job({"data": name, "model": model, "seed": seed, "without": t}, TrainConfig(
                    **base, watch=False, task_weights={t: 0.0})) for t in tasks]
    return out


def removal(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Per (data, model, seed, remaining task): the removal benefit and the full run's conflict figures."""
    full = {(r["data"], r["model"], r["seed"]): r for r in rows if r["without"] is None}
    out = []
    for r in rows:
        if r["without"] is None:
            continue
        ref = full[(r["data"], r["model"], r["seed"])]
        for index, (task, metrics) in enumerate(r["test"].items()):
            if task == r["without"]:
                continue
            metric = primary_metric(metrics)
            before, after = ref["test"][task][metric], metrics[metric]
            out.append({"data": r["data"], "model": r["model"], "seed": r["seed"], "task": task,
                        "task_index": index, "without": r["without"], "metric": metric, "full": before,
                        "removed": after, "benefit": -harm(metric, after - before),
                        "cosine_all": ref["cosine_all"], "below_share": ref["below_share"]})
    return pd.DataFrame(out)


def summarise(rows: list[dict[str, Any]], effects: pd.DataFrame) -> pd.DataFrame:
    """Per (data, model): conflict, similarity and per-expert routing figures; removal benefit per task."""
    full = pd.DataFrame([{k: r[k] for k in ("data", "model", "seed", "cosine_all", "below_share", "cka_mean",
                                              "cka_max")} for r in rows if r["without"] is None])
    experts = expert_table(rows)
    keys = ["data", "model"]
    out = full.groupby(keys, sort=False).agg(
        seeds=("seed", "size"), cosine_all=("cosine_all", "mean"), cosine_all_std=("cosine_all", "std"),
        below_share=("below_share", "mean"), cka_mean=("cka_mean", "mean"), cka_max=("cka_max", "mean"))
    corr = experts.groupby(keys, sort=False)[["cosine", "shared_use"]].apply(
        lambda g: spearman(g["cosine"], g["shared_use"]))
    out["expert_cos_vs_shared_use_spearman"] = corr
    for i in (0, 1):  # the benefit to the first and to the second task of the data set
        part = effects[effects["task_index"] == i].groupby(keys, sort=False)["benefit"].agg(["mean", "std"])
        out[f"benefit_task{i}_mean"], out[f"benefit_task{i}_std"] = part["mean"], part["std"]
    return out.reset_index()


def expert_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per full run and expert module."""
    return pd.DataFrame([{"data": r["data"], "model": r["model"], "seed": r["seed"], **e}
                         for r in rows if r["without"] is None for e in r["experts"]])


def figure(experts: pd.DataFrame, effects: pd.DataFrame) -> go.Figure:
    """Left: each expert's task cosine against shared use; right: conflict cosine against removal benefit."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "per expert: cosine vs shared use", "per run: conflict vs removal benefit"))
    colors = dict(zip(DATA, ("#636efa", "#ef553b", "#00cc96", "#ab63fa"), strict=True))
    symbols = {"mmoe": "circle", "omoe": "x"}
    for (data, model), part in experts.groupby(["data", "model"], sort=False):
        fig.add_scatter(x=part["shared_use"], y=part["cosine"], mode="markers", name=f"{data}, {model}",
                        legendgroup=f"{data}{model}", marker={"color": colors[data], "symbol": symbols[model]},
                        row=1, col=1)
    for (data, model), part in effects.groupby(["data", "model"], sort=False):
        fig.add_scatter(x=part["cosine_all"], y=part["benefit"], mode="markers", name=f"{data}, {model}",
                        legendgroup=f"{data}{model}", showlegend=False,
                        marker={"color": colors[data], "symbol": symbols[model]}, row=1, col=2)
    fig.add_hline(y=0, line={"color": "grey", "dash": "dot"}, row=1, col=1)
    fig.add_hline(y=0, line={"color": "grey", "dash": "dot"}, row=1, col=2)
    fig.update_xaxes(title_text="shared use: the smaller task's mean gate share", row=1, col=1)
    fig.update_yaxes(title_text="tasks' gradient cosine on the expert", row=1, col=1)
    fig.update_xaxes(title_text="tasks' gradient cosine, all shared parameters", row=1, col=2)
    fig.update_yaxes(title_text="benefit of removing the other task (+: it hurt)", row=1, col=2)
    fig.update_layout(title="MMoE (circles) vs OMoE (crosses): conflict, routing and task removal, second half "
                      "of training", legend={"font": {"size": 11}})
    return fig


def main() -> None:
    args = parser(__doc__.splitlines()[0], seeds=5, steps=1000).parse_args()
    jobs = jobs_for(args.seeds, args.steps)
    started = time.perf_counter()
    rows = run_all(jobs, args.workers, worker=functools.partial(run_job, summarise=watched_summary))
    wall = time.perf_counter() - started
    effects = removal(rows)
    summary = summarise(rows, effects)
    experts = expert_table(rows)
    rho = spearman(effects["cosine_all"], effects["benefit"])
    stem = "conflict_and_transfer" + (f"_{args.tag}" if args.tag else "")
    write_results(rows, args.out, stem, settings(
        args, wall_seconds=wall, data={k: list(v) for k, v in DATA.items()}, models=MODELS,
        conflict_every=CONFLICT_EVERY, summary=summary.to_dict("records"), removal=effects.to_dict("records"),
        conflict_vs_benefit_spearman=rho))
    summary.to_csv(args.out / f"{stem}_summary.csv", index=False)
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print(effects.groupby(["data", "model", "task"], sort=False)["benefit"].agg(["mean", "std", "size"])
              .to_string(float_format=lambda v: f"{v:+.4f}"))
    print(f"Spearman(conflict cosine, removal benefit) over {len(effects)} cases: {rho:+.3f}")
    print(f"wall time {wall:.0f} s")
    save_figure(figure(experts, effects), args.out, stem)


if __name__ == "__main__":
    main()
