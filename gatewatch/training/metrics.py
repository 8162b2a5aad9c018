"""Evaluation of multi-task models: per-task loss plus AUC (binary tasks) or MSE (regression tasks).

``evaluate(model, x, y, tasks, task_types)`` runs the model in eval mode (no gradients, in batches)
and returns ``{task: {"loss": ..., "auc": ...}}`` for binary tasks (loss = BCE with logits) and
``{task: {"loss": ..., "mse": ...}}`` for regression tasks (loss = MSE). The model's training mode is
restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validate import positive_int

TASK_TYPES = ("binary", "regression")


def check_task_types(tasks: Sequence[str], task_types: Sequence[str]) -> None:
    """Raise ValueError unless there is one known type per task."""
    if len(tasks) != len(task_types):
        raise ValueError(f"got {len(task_types)} task types for {len(tasks)} tasks {list(tasks)}; pass one per task.")
    unknown = sorted({t for t in task_types if t not in TASK_TYPES})
    if unknown:
        raise ValueError(f"unknown task types {unknown}; each task type is one of {TASK_TYPES}.")


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values``; tied values share the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # start index of each run of equal values, and the run's length
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    lengths = np.diff(np.r_[starts, len(values)])
    mean_rank = starts + (lengths + 1) / 2.0  # 1-based mean rank of the run
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, lengths)
    return ranks


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg)); ties count one half. NaN if one class only."""
    labels = np.asarray(labels).reshape(-1) > 0.5
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in length: {labels.shape[0]} vs {scores.shape[0]}.")
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = float(average_ranks(scores)[labels].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 8192) -> list[Tensor]:
    """The model's raw outputs on ``x`` (one ``[N]`` float tensor per task, on the CPU), in eval mode."""
    batch_size = positive_int("batch_size", batch_size)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else x.device
    was_training = model.training
    model.eval()
    try:
        parts: list[list[Tensor]] = []
        for start in range(0, len(x), batch_size):
            out = model(x[start : start + batch_size].to(device))
            parts.append([o.detach().float().reshape(-1).cpu() for o in out])
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError("cannot evaluate on an empty split (x has 0 rows).")
    return [torch.cat(column) for column in zip(*parts, strict=True)]


def task_metrics(output: Tensor, target: Tensor, task_type: str) -> dict[str, float]:
    """``{"loss", "auc"}`` (binary: BCE with logits) or ``{"loss", "mse"}`` (regression) of one task."""
    target = target.float().reshape(-1)
    if task_type == "binary":
        loss = float(F.binary_cross_entropy_with_logits(output, target))
        return {"loss": loss, "auc": roc_auc(target.numpy(), output.numpy())}
    if task_type == "regression":
        mse = float(F.mse_loss(output, target))
        return {"loss": mse, "mse": mse}
    raise ValueError(f"unknown task type {task_type!r}; use one of {TASK_TYPES}.")


def evaluate(
    model: nn.Module,
    splits_x: Tensor,
    splits_y: Tensor,
    tasks: Sequence[str],
    task_types: Sequence[str],
    batch_size: int = 8192,
) -> dict[str, dict[str, float]]:
    """Per-task metrics of ``model`` on inputs ``splits_x`` ``[N, D]`` and targets ``splits_y`` ``[N, K]``."""
    check_task_types(tasks, task_types)
    if splits_y.ndim != 2 or splits_y.shape[1] != len(tasks) or len(splits_y) != len(splits_x):
        raise ValueError(
            f"targets must be [N, {len(tasks)}] with N = {len(splits_x)} rows of x, got {list(splits_y.shape)}."
        )
    outputs = predict(model, splits_x, batch_size)
    if len(outputs) != len(tasks):
        raise ValueError(f"the model returned {len(outputs)} outputs for {len(tasks)} tasks {list(tasks)}.")
    return {
        task: task_metrics(out, splits_y[:, k].cpu(), kind)
        for k, (task, out, kind) in enumerate(zip(tasks, outputs, task_types, strict=True))
    }
