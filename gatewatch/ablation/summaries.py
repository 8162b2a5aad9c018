"""Summaries of ablation results (pandas only, no torch): what ``gatewatch ablate`` prints and the Ablations
page shows under its charts. Each takes the result table of one kind (see :mod:`gatewatch.ablation`)."""

from __future__ import annotations

import math

import pandas as pd

from ..metric_direction import primary_metric


def knockout_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per task and metric: the most harmful knock-out, its harm, the total harm, and their ratio.

    ``concentration`` = max harm / sum of positive harms: near 1 when one expert carries the task
    (a polarized gate), small when the damage is spread.
    """
    rows = []
    for (task, metric), g in df.groupby(["task", "metric"], sort=False):
        worst = g.loc[g["harm"].idxmax()] if g["harm"].notna().any() else g.iloc[0]
        positive = g["harm"].clip(lower=0).sum()
        rows.append({"task": task, "metric": metric, "base": float(g["base"].iloc[0]), "worst_gate": worst["gate"],
                     "worst_expert": worst["expert_name"], "max_harm": float(worst["harm"]),
                     "total_harm": float(positive),
                     "concentration": float(worst["harm"] / positive) if positive > 0 else math.nan})
    return pd.DataFrame(rows, columns=["task", "metric", "base", "worst_gate", "worst_expert", "max_harm",
                                       "total_harm", "concentration"])


def knockout_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per knock-out, task and metric: the gate, the expert, its load in the unmasked evaluation and with
    it knocked out (0 when the mask reaches the gate; NaN in results written before it was measured), and the
    metric's base, ablated value and change."""
    out = df.assign(ablated_load=df.get("ablated_load", math.nan), load=df.get("load", math.nan))
    out = out.rename(columns={"expert_name": "expert", "expert": "index"})
    return out[["gate", "expert", "load", "ablated_load", "task", "metric", "base", "ablated", "delta"]
               ].reset_index(drop=True)


def sweep_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread over seeds of each task's metric at each rate, and the mean harm."""
    g = df.groupby(["task", "metric", "rate"], sort=False)
    out = g.agg(mean=("value", "mean"), std=("value", "std"), harm=("harm", "mean"), seeds=("seed", "nunique"))
    return out.reset_index().sort_values(["task", "metric", "rate"], kind="stable").reset_index(drop=True)


def comparison_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per rate, task and metric: mean and spread over seeds, with the mean gate health."""
    g = df.groupby(["rate", "task", "metric"], sort=False)
    out = g.agg(mean=("value", "mean"), std=("value", "std"), seeds=("seed", "nunique"),
                polarized_gates=("polarized_gates", "mean"), dead_experts=("dead_experts", "mean"),
                mean_entropy=("mean_entropy", "mean"), max_top_share=("max_top_share", "mean"))
    return out.reset_index().sort_values(["task", "metric", "rate"], kind="stable").reset_index(drop=True)


def removal_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per dropped task and remaining task (its primary metric): the mean change over seeds of the remaining
    task's metric without the dropped one, its spread (standard error over seeds; NaN with one seed), the verdict
    (``hurts`` when the remaining task does better without it by at least two standard errors, ``helps`` when
    worse, else ``no clear effect``; with one seed the sign decides) and the sentence."""
    rows = []
    for (dropped, task), g in df.groupby(["dropped", "task"], sort=False):
        metric = primary_metric(g["metric"])
        sel = g[g["metric"] == metric]
        n, mean, harm = len(sel), float(sel["delta"].mean()), float(sel["harm"].mean())
        se = float(sel["delta"].std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
        clear = abs(mean) >= 2 * se if n > 1 else mean != 0
        verdict = "no clear effect" if not clear or harm == 0 else "hurts" if harm < 0 else "helps"
        name = metric.upper() if metric.lower() in ("auc", "mse") else metric
        spread = f"+-{se:.3g}" if n > 1 else "one seed"
        effect = {"hurts": f"{dropped} hurts {task} (negative transfer)", "helps": f"{dropped} helps {task}",
                  "no clear effect": f"no clear effect of {dropped} on {task}"}[verdict]
        rows.append({"dropped": dropped, "task": task, "metric": metric, "full": float(sel["full"].mean()),
                     "delta": mean, "se": se, "seeds": n, "verdict": verdict,
                     "sentence": f"without {dropped}, {task} {name} {mean:+.3g} ({spread}): {effect}"})
    return pd.DataFrame(rows, columns=["dropped", "task", "metric", "full", "delta", "se", "seeds", "verdict",
                                       "sentence"])
