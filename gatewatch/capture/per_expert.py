"""How often a quantity writes its per-expert rows, so that a run's size stays bounded however wide the model is.

A quantity whose rows grow with the expert count (one row or value per gate x expert, or gate x group x expert)
writes them in every window while a window holds at most ``budget`` such values (:data:`PER_EXPERT_BUDGET`: 512,
so every model up to 8 gates x 64 experts keeps every window), and above that in every K-th window, K chosen so
that the average stays within the budget. The first window is always kept, and so is the run's last (at close).
The per-window aggregates (entropy, MaxVio, dead count ...) are written every window whatever the schedule.
"""

from __future__ import annotations

import math

import numpy as np

PER_EXPERT_BUDGET = 512  # per-expert values a window stores on average, at most


def per_expert_every(values_per_window: int, budget: int | None = None) -> int:
    """K: windows between two windows that keep their per-expert rows (1 while ``values_per_window <= budget``)."""
    budget = PER_EXPERT_BUDGET if budget is None else budget
    return max(1, math.ceil(values_per_window / budget))


def per_expert_due(window_index: int | np.ndarray, values_per_window: int, budget: int | None = None, *,
                   every: int | None = None) -> np.ndarray:
    """Whether window ``window_index`` (0 for the run's first) keeps its per-expert rows: the first and every K-th
    after it (K from :func:`per_expert_every`, or ``every`` when given). The caller keeps the run's last window
    too (:class:`PerExpertSchedule` does)."""
    k = every if every is not None else per_expert_every(values_per_window, budget)
    return np.asarray(window_index) % k == 0


class PerExpertSchedule:
    """One quantity's schedule over the windows it writes: call :meth:`due` once per flush with the flush's window
    count; :meth:`close` before the last flush, so that the run's last window is kept."""

    def __init__(self, every: int | None = None, budget: int | None = None) -> None:
        self.every_given, self.budget = every, budget
        self.windows = 0  # windows scheduled so far
        self.every: int | None = None  # K of the latest flush (None before the first)
        self.closing = False

    def due(self, count: int, values_per_window: int) -> np.ndarray:
        """Which of the flush's ``count`` next windows keep their per-expert rows."""
        self.every = self.every_given or per_expert_every(values_per_window, self.budget)
        keep = per_expert_due(self.windows + np.arange(count), values_per_window, every=self.every)
        self.windows += count
        if self.closing and count:
            keep[-1] = True
        return keep

    def close(self) -> None:
        self.closing = True
