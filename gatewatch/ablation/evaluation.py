"""Evaluating a model for an ablation: the metrics it returns, and eval mode. Which direction of a metric is
worse lives in :mod:`gatewatch.metric_direction` (torch-free, shared with the figures)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from ..metric_direction import HIGHER_IS_BETTER, PRIMARY_METRICS, harm, primary_metric
from ..training.metrics import evaluate as evaluate_metrics
from .errors import AblationError

Metrics = Mapping[str, Mapping[str, float]]  # {task: {metric: value}}
EvalFn = Callable[[nn.Module], Metrics]

__all__ = ["HIGHER_IS_BETTER", "PRIMARY_METRICS", "EvalFn", "Metrics", "eval_mode", "evaluate_checked", "evaluator",
           "harm", "primary_metric", "with_harm"]


def with_harm(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a ``harm`` column: the :func:`harm` of each row's ``metric`` and ``delta``."""
    df["harm"] = [harm(m, d) for m, d in zip(df["metric"], df["delta"], strict=True)]
    return df


def evaluator(x: torch.Tensor, y: torch.Tensor, tasks: Sequence[str], task_types: Sequence[str]) -> EvalFn:
    """``evaluate(model)`` on fixed data with :func:`gatewatch.training.metrics.evaluate` (loss + AUC / MSE)."""
    return lambda model: evaluate_metrics(model, x, y, list(tasks), list(task_types))


def evaluate_checked(model: nn.Module, evaluate: EvalFn, where: str) -> dict[str, dict[str, float]]:
    """``evaluate(model)`` without gradients, as plain floats; AblationError when it is not {task: {metric: value}}.

    ``where`` completes the error message (e.g. "at gate dropout 0.1").
    """
    with torch.no_grad():
        metrics = evaluate(model)
        if not isinstance(metrics, Mapping) or not metrics:
            raise AblationError(f"The evaluation function returned {metrics!r} {where}; it must return "
                                "{task: {metric: value}}.")
        return {str(t): {str(m): float(v) for m, v in vals.items()} for t, vals in metrics.items()}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block with ``model`` in eval mode, then give every submodule back the mode it had."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
