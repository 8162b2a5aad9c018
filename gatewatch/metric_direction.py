"""Which way a metric is worse, and which metric a task shows first (plain Python, no torch).

Shared by the ablations (``harm`` columns) and their figures.
"""

from __future__ import annotations

from collections.abc import Iterable

HIGHER_IS_BETTER = frozenset({"auc", "accuracy", "acc", "r2"})
PRIMARY_METRICS = ("auc", "mse", "loss")


def harm(metric: str, delta: float) -> float:
    """``delta`` signed so that positive means worse (metrics in HIGHER_IS_BETTER flip sign)."""
    return -delta if metric.lower() in HIGHER_IS_BETTER else delta


def primary_metric(metrics: Iterable[str]) -> str:
    """The metric shown first for a task: AUC, else MSE, else loss, else the first one."""
    names = list(dict.fromkeys(metrics))
    return next((m for m in PRIMARY_METRICS if m in names), names[0] if names else "loss")
