"""Gradient conflict on the host: the rows of the ``conflict`` and ``purity`` tables from the reduced statistics
of each conflict step (see :func:`~gatewatch.quantities.conflict.maths.task_statistics` for their layout)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd

from ...schema import conform
from .layout import SharedLayout
from .maths import PURITY_BINS, pair_table, task_pairs


def conflict_tables(steps: list[int], tasks: list[str], layout: SharedLayout, host: np.ndarray, threshold: float,
                    below_so_far: dict[tuple[str, str, str], np.ndarray]) -> dict[str, pd.DataFrame]:
    """Rows of the conflict steps ``steps`` (``host [S, n]``: one flat statistics row each); ``below_so_far``
    carries the Recon-style count of steps below ``threshold`` from one flush to the next."""
    k, n_units, n_groups, pairs = len(tasks), len(layout.units), len(layout.groups), task_pairs(len(tasks))
    steps_a = np.array(steps)
    sizes = [n_units * k * k, n_units * len(pairs)]
    grams, disagree, counts = np.split(host, np.cumsum(sizes), axis=1)
    grams, disagree = grams.reshape(len(steps_a), n_units, k, k), disagree.reshape(len(steps_a), n_units, len(pairs))
    counts = counts.reshape(len(steps_a), n_groups, PURITY_BINS + 1)[:, :, :PURITY_BINS]
    # counts on a sample (maths.SignSample) scaled to each unit's / group's element count
    units = layout.units
    disagree = disagree * (layout.elements(units) / layout.sampled(units))[None, :, None]
    counts = counts * (layout.elements(layout.group_bounds) / layout.sampled(layout.group_bounds))[None, :, None]
    if layout.per_param:
        member = np.zeros((n_groups, n_units))
        member[layout.group_of, np.arange(n_units)] = 1.0
        by_group = (np.einsum("gu,sukl->sgkl", member, grams), np.einsum("gu,sup->sgp", member, disagree))
    else:
        by_group = (grams, disagree)
    scopes = [("module", layout.groups, *by_group, layout.elements(layout.group_bounds)),
              ("all", ["all"], by_group[0].sum(1, keepdims=True), by_group[1].sum(1, keepdims=True),
               np.array([float(layout.size)]))]
    if layout.per_param:
        scopes.insert(0, ("param", layout.names, grams, disagree, layout.elements(layout.bounds)))
    frames = [scope_rows(steps_a, tasks, pairs, *scope, threshold, below_so_far) for scope in scopes]
    return {"conflict": conform("conflict", pd.concat(frames, ignore_index=True)),
            "purity": purity_rows(steps_a, [*layout.groups, "all"],
                                  np.concatenate([counts, counts.sum(1, keepdims=True)], axis=1))}


def scope_rows(steps: np.ndarray, tasks: list[str], pairs: list[tuple[int, int]], scope: str, names: list[str],
               gram: np.ndarray, disagree: np.ndarray, elements: np.ndarray, threshold: float,
               below_so_far: dict[tuple[str, str, str], np.ndarray]) -> pd.DataFrame:
    """Rows of one scope: ``gram [S, N, K, K]`` and ``disagree [S, N, pairs]`` over S steps and N names."""
    n_steps, n_names = len(steps), len(names)
    columns: dict[str, list[np.ndarray]] = defaultdict(list)
    for i, (a, b) in enumerate(pairs):
        stats = pair_table(gram, disagree[..., i], elements, a, b)
        hits = ((stats["cosine"] < threshold) & ~stats["zero_grad"]).astype(np.int64)
        key = (scope, tasks[a], tasks[b])
        below = below_so_far.get(key, np.zeros(n_names, dtype=np.int64)) + np.cumsum(hits, axis=0)
        below_so_far[key] = below[-1]
        stats["below"] = below
        for col, values in stats.items():
            columns[col].append(values.reshape(-1))
        columns["task_a"].append(np.full(n_steps * n_names, tasks[a], dtype=object))
        columns["task_b"].append(np.full(n_steps * n_names, tasks[b], dtype=object))
    n_pairs = len(pairs)
    return pd.DataFrame({
        "step": np.tile(np.repeat(steps, n_names), n_pairs), "scope": scope,
        "name": np.tile(np.array(names, dtype=object), n_steps * n_pairs),
        **{col: np.concatenate(parts) for col, parts in columns.items()},
        "elements": np.tile(elements.astype(np.int64), n_steps * n_pairs),
    })


def purity_rows(steps: np.ndarray, names: list[str], counts: np.ndarray) -> pd.DataFrame:
    """Rows of the ``purity`` table from ``counts [S, N, bins]`` (the last name is ``all``)."""
    n_steps, n_names, bins = counts.shape
    edges = np.linspace(0.0, 1.0, bins + 1)
    scopes = np.array(["module"] * (n_names - 1) + ["all"], dtype=object)
    return conform("purity", pd.DataFrame({
        "step": np.repeat(steps, n_names * bins), "scope": np.tile(np.repeat(scopes, bins), n_steps),
        "name": np.tile(np.repeat(np.array(names, dtype=object), bins), n_steps),
        "bin": np.tile(np.arange(bins), n_steps * n_names), "lo": np.tile(edges[:-1], n_steps * n_names),
        "hi": np.tile(edges[1:], n_steps * n_names), "count": counts.reshape(-1),
    }))
