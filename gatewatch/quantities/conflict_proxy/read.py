"""Conflict proxy, read half: the ``conflict_proxy`` table (pandas only).

Its rows feed the report's ``expert_conflict`` list and the Conflict page with ``mode: "proxy"`` (see
:func:`gatewatch.quantities.conflict.read.expert_table`); this half adds no section and no rule of its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from ...declarations import Add, ReadHalf, table_rows

TABLES: dict[str, dict[str, str]] = {
    # conflict proxy (GateWatch(conflict_proxy=True)): one row per step x expert module x task pair. cosine: of
    # the two tasks' gradients at the expert's output, taken as gate weight x gradient at the task's tower input
    # (one backward, no extra pass); norm_a/norm_b: their norms; below: steps so far with cosine below the run's
    # conflict_threshold; zero_grad: a task's gates do not mix the expert (or its gradient is zero)
    "conflict_proxy": {
        "step": "int64", "name": "string", "task_a": "string", "task_b": "string", "cosine": "float64",
        "norm_a": "float64", "norm_b": "float64", "below": "int64", "zero_grad": "bool",
    },
}


def proxy_rows(steps: np.ndarray, grams: np.ndarray, tasks: list[str], modules: list[str], threshold: float,
               below_so_far: dict[tuple[str, str], np.ndarray]) -> pd.DataFrame:
    """Rows of the ``conflict_proxy`` table from ``grams [S, K, K, M]`` (per step, the tasks' dot products at
    each of the M expert modules); ``below_so_far`` carries the running count from one flush to the next."""
    frames = []
    for a in range(len(tasks)):
        for b in range(a + 1, len(tasks)):
            na, nb = np.sqrt(grams[:, a, a]), np.sqrt(grams[:, b, b])
            zero = (na == 0) | (nb == 0)
            cosine = np.where(zero, 0.0, grams[:, a, b] / np.where(zero, 1.0, na * nb))
            key = (tasks[a], tasks[b])
            hits = ((cosine < threshold) & ~zero).astype(np.int64)
            below = below_so_far.get(key, np.zeros(len(modules), dtype=np.int64)) + np.cumsum(hits, axis=0)
            if len(steps):
                below_so_far[key] = below[-1]
            frames.append(pd.DataFrame({
                "step": np.repeat(steps, len(modules)), "name": np.tile(np.array(modules, dtype=object), len(steps)),
                "task_a": tasks[a], "task_b": tasks[b], "cosine": cosine.ravel(), "norm_a": na.ravel(),
                "norm_b": nb.ravel(), "below": below.ravel(), "zero_grad": zero.ravel(),
            }))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(TABLES["conflict_proxy"]))


def proxy_scalars(tables: Mapping[str, pd.DataFrame], add: Add) -> None:
    """``conflict_proxy/<a>~<b>/module/<module>/cosine``, every step: labelled as the proxy."""
    for row in table_rows(tables, "conflict_proxy"):
        add(f"conflict_proxy/{row.task_a}~{row.task_b}/module/{row.name}/cosine", row.cosine, row.step)


QUANTITY = ReadHalf(tables=TABLES, scalars=proxy_scalars)
