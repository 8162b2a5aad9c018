"""The seesaw, read half: the ``seesaw`` rule over per-task validation metrics (the ``eval`` table).

Over each task's last ``seesaw_evals`` evaluations, the least-squares slope of its primary metric (AUC, else
MSE, else loss: :func:`gatewatch.metric_direction.primary_metric`) against the step, with its standard error
``sqrt(sum(residual^2) / (n - 2) / sum((step - mean step)^2))``. A trend is beyond noise when
``|slope| >= seesaw_se`` standard errors; its direction says better or worse per metric (AUC up, MSE and loss
down). The rule fires for each pair of tasks where one improves and the other worsens, both beyond noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ...declarations import ReadHalf, Section
from ...metric_direction import harm, primary_metric
from ...rules import Finding, Thresholds

if TYPE_CHECKING:
    from ...loaded_run import Run

REMEDY_TEXTS = {
    "seesaw": (
        "The tasks compete for the shared capacity: one gains what the other loses. Check the gradient conflict "
        "(GateWatch(conflict_every=...)) and whether dropping the worsening task's partner helps it "
        "(gatewatch ablate RUN --drop-task TASK); give the tasks their own experts (CGC/PLE), re-weight the losses "
        "(gw.remedies.UncertaintyWeighting), or stop at the best step of the task that matters most."
    ),
}


@dataclass(frozen=True)
class Trend:
    """The least-squares trend of one task's metric over its recent evaluations."""

    task: str
    metric: str
    slope: float  # per step
    se: float  # standard error of the slope
    first: int
    last: int
    n: int

    @property
    def z(self) -> float:
        """The slope in standard errors (inf for an exact line)."""
        return abs(self.slope) / self.se if self.se > 0 else (math.inf if self.slope else 0.0)

    @property
    def change(self) -> float:
        """The fitted change over the window."""
        return self.slope * (self.last - self.first)


def slope_and_se(steps: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of ``values`` against ``steps`` and its standard error (n >= 3 points)."""
    x = steps.astype(np.float64) - steps.mean()
    sxx = float(x @ x)
    slope = float(x @ (values - values.mean())) / sxx
    residual = values - values.mean() - slope * x
    return slope, math.sqrt(float(residual @ residual) / (len(x) - 2) / sxx)


def trends(run: Run, count: int, split: str = "val") -> list[Trend]:
    """Each task's trend of its primary metric over its last ``count`` evaluations on ``split`` (tasks with
    fewer than three evaluations left out)."""
    table = run.table("eval")
    table = table[(table["split"] == split) & np.isfinite(table["value"].astype("float64"))]
    out = []
    for task, rows in table.groupby("task", sort=False):
        metric = primary_metric(rows["metric"])
        series = rows[rows["metric"] == metric].groupby("step")["value"].mean().sort_index().iloc[-count:]
        if len(series) < 3:
            continue
        steps = series.index.to_numpy(dtype=np.float64)
        slope, se = slope_and_se(steps, series.to_numpy(dtype=np.float64))
        out.append(Trend(str(task), metric, slope, se, int(steps[0]), int(steps[-1]), len(series)))
    return out


def describe(trend: Trend) -> str:
    return (f"{trend.task} {trend.metric.upper() if trend.metric.lower() in ('auc', 'mse') else trend.metric} "
            f"{trend.change:+.4g} over steps {trend.first}-{trend.last} ({trend.z:.1f} SE)")


def seesaw(run: Run, th: Thresholds) -> list[Finding]:
    """One warning per (improving, worsening) pair of tasks, both trends at least ``seesaw_se`` SE from 0."""
    beyond = [t for t in trends(run, int(th.seesaw_evals)) if t.z >= th.seesaw_se]
    better = [t for t in beyond if harm(t.metric, t.slope) < 0]
    worse = [t for t in beyond if harm(t.metric, t.slope) > 0]
    return [Finding("seesaw", "warning", None, w.task, w.last,
                    f"seesaw: over the last {min(b.n, w.n)} evaluations {describe(b)} improves while {describe(w)} "
                    f"worsens.", REMEDY_TEXTS["seesaw"], "overview")
            for b in better for w in worse]


def seesaw_section(run: Run, th: Thresholds) -> list[dict[str, Any]]:
    """Every task's recent trend (slope per step, its standard error, improving / worsening / flat)."""
    out = []
    for t in trends(run, int(th.seesaw_evals)):
        direction = "flat" if t.z < th.seesaw_se else ("improving" if harm(t.metric, t.slope) < 0 else "worsening")
        out.append({"task": t.task, "metric": t.metric, "slope": t.slope, "se": t.se, "first_step": t.first,
                    "last_step": t.last, "evaluations": t.n, "trend": direction})
    return out


QUANTITY = ReadHalf(sections=(Section("seesaw", seesaw_section),), rules=(seesaw,),
                    remedy_texts=REMEDY_TEXTS)  # reads the core ``eval`` table; has none of its own
