"""The seesaw finding: slope and standard error against a plain-Python reference, and the rule on logged metrics."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import gatewatch as gw
from gatewatch.loaded_run import Run
from gatewatch.models import MMoE
from gatewatch.quantities.seesaw.read import seesaw, slope_and_se
from gatewatch.report import build_report
from gatewatch.rules import Thresholds
from gatewatch.schema import frame


def reference(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Ordinary least squares in plain Python: slope, and its standard error sqrt(s^2 / Sxx), s^2 = SSR / (n-2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    ssr = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return slope, math.sqrt(ssr / (n - 2) / sxx)


def test_slope_and_standard_error_match_the_plain_reference() -> None:
    rng = random.Random(0)
    for n in (3, 6, 20):
        xs = sorted(rng.uniform(0, 5000) for _ in range(n))
        ys = [0.7 + 1e-5 * x + rng.gauss(0, 0.01) for x in xs]
        got = slope_and_se(np.array(xs), np.array(ys))
        assert got == pytest.approx(reference(xs, ys), rel=1e-9)


def eval_run(series: dict[tuple[str, str], list[float]], steps: list[int]) -> Run:
    rows = [{"step": s, "split": "val", "task": t, "metric": m, "value": v}
            for (t, m), values in series.items() for s, v in zip(steps, values, strict=True)]
    return Run(Path("r"), {}, {"eval": frame("eval", rows)}, "finished")


STEPS = [100, 200, 300, 400, 500, 600]


def test_seesaw_fires_when_one_task_improves_and_another_worsens_beyond_noise() -> None:
    run = eval_run({("income", "auc"): [0.80, 0.81, 0.815, 0.826, 0.83, 0.842],
                    ("marital", "auc"): [0.90, 0.895, 0.885, 0.882, 0.87, 0.866]}, STEPS)
    (found,) = seesaw(run, Thresholds())
    assert (found.code, found.severity, found.task, found.step) == ("seesaw", "warning", "marital", 600)
    assert "income AUC +0.0" in found.message and "marital AUC -0.0" in found.message and "improves" in found.message


def test_direction_is_per_metric_and_noise_does_not_fire() -> None:
    rising = [0.30, 0.31, 0.325, 0.33, 0.345, 0.35]
    # MSE rising is worse, AUC rising is better: a seesaw
    assert seesaw(eval_run({("a", "auc"): [0.70, 0.71, 0.72, 0.735, 0.74, 0.75], ("b", "mse"): rising}, STEPS),
                  Thresholds())
    # both improve: no seesaw
    assert not seesaw(eval_run({("a", "auc"): [0.70, 0.71, 0.72, 0.735, 0.74, 0.75],
                                ("b", "mse"): rising[::-1]}, STEPS), Thresholds())
    # a worsening trend within noise (|slope| < 2 SE): no seesaw
    noisy = [0.90, 0.86, 0.91, 0.85, 0.90, 0.86]
    assert not seesaw(eval_run({("a", "auc"): [0.70, 0.71, 0.72, 0.735, 0.74, 0.75], ("b", "auc"): noisy}, STEPS),
                      Thresholds())


def test_seesaw_from_metrics_logged_through_the_watch(tmp_path: Path) -> None:
    model = MMoE(in_dim=4, tasks=["ctr", "cvr"], n_experts=2)
    watch = gw.GateWatch(model, tasks=["ctr", "cvr"], log_dir=tmp_path, tensorboard=False)
    for i, step in enumerate(STEPS):
        watch.log_metrics(step, {"ctr": {"auc": 0.7 + 0.01 * i, "loss": 0.5}, "cvr": {"auc": 0.8 - 0.012 * i}})
    watch.log_losses({"ctr": torch.tensor(0.5), "cvr": torch.tensor(0.4)})
    watch.close()
    run = gw.load_run(tmp_path)
    assert [(f.code, f.task) for f in gw.findings.find(run) if f.code == "seesaw"] == [("seesaw", "cvr")]
    report = build_report(run)
    assert {r["task"]: r["trend"] for r in report["seesaw"]} == {"ctr": "improving", "cvr": "worsening"}
