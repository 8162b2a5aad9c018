"""Conflict meets routing (pandas only): per expert module and task pair, the gradient cosine on the expert
next to how much each task's gates use it.

The ``conflict`` table's module rows are joined with the ``shares`` table through the expert map each gate
keeps in run.json (``expert_modules``, see :mod:`gatewatch.gating.expert_map`). A task's share on an expert is the
mean, over the task's own gates that mix it, of the gate's mean weight on its column; a task whose gates do not
mix the expert has share 0. When no gate has a task (OMoE: one gate serves every task; a sparse MoE's routers,
one per layer), every task's share is that of the task-less gates, the same for every task: ``share_source``
says which of the two a row's shares are. Fused experts are joined by their names ``<module>[i]``. Runs
recorded before the map was stored fall back on the default inference done on the module names: column i of an
E-expert gate is ``<container>.<i>`` when the conflict table holds exactly one such container of E modules.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

COLUMNS = ["step", "window_step", "mode", "expert", "module", "task_a", "task_b", "cosine", "below", "measured",
           "share_a", "share_b", "zero_grad", "experts", "share_source"]
TASK_GATE = "task gate"  # share_source: each task's share comes from its own gates
SHARED_ROUTER = "shared router (same for every task)"  # one router serves every task: one share for all
SHARED_GATE = "shared gate (same for every task)"


def expert_columns(gates: list[dict[str, Any]], modules: list[str]) -> pd.DataFrame:
    """One row per gate column that weighs an expert module: ``gate``, ``task``, ``column``, ``module``,
    ``expert`` (the column's label), ``experts`` (the gate's width) and ``router`` (the gate is a sparse router).
    Fused experts (run.json's ``fused_experts``) are named ``<module>[i]``, as conflict names their groups."""
    rows = []
    for g in gates:
        if not isinstance(g, dict) or "name" not in g:
            continue
        paths = g.get("expert_modules") or _fused_names(g) or _legacy_map(g, modules)
        names = g.get("expert_names") or [str(i) for i in range(len(paths or []))]
        for i, path in enumerate(paths or []):
            rows.append({"gate": g["name"], "task": g.get("task"), "column": i, "module": str(path),
                         "expert": str(names[i]) if i < len(names) else str(i), "experts": len(paths or []),
                         "router": g.get("scoring") is not None})
    return pd.DataFrame(rows, columns=["gate", "task", "column", "module", "expert", "experts", "router"])


def _fused_names(gate: dict[str, Any]) -> list[str] | None:
    """``<module>[i]`` for each expert of a gate whose experts are fused (None otherwise)."""
    fused = gate.get("fused_experts")
    if not isinstance(fused, dict) or not isinstance(fused.get("experts"), int):
        return None
    return [f"{fused['module']}[{i}]" for i in range(fused["experts"])]


def _legacy_map(gate: dict[str, Any], modules: list[str]) -> list[str] | None:
    """The default map rebuilt from the module names of a run recorded before run.json kept it."""
    if "expert_modules" in gate or not isinstance(gate.get("experts"), int):
        return None
    n = gate["experts"]
    parents: dict[str, set[int]] = {}
    for name in modules:
        match = re.fullmatch(r"(.+)\.(\d+)", name)
        if match:
            parents.setdefault(match.group(1), set()).add(int(match.group(2)))
    fits = [p for p, kids in parents.items() if kids == set(range(n))]
    return [f"{fits[0]}.{i}" for i in range(n)] if len(fits) == 1 else None


def task_shares(columns: pd.DataFrame, shares: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """Per window step, module and task: the task's mean share on the module (0 where its gates do not mix it)."""
    if not len(columns) or not len(shares):
        return pd.DataFrame(columns=["window_step", "module", "task", "share"])
    own = {t for t in columns["task"].dropna()}
    parts = []
    for task in tasks:
        mine = columns[columns["task"] == task] if own else columns[columns["task"].isna()]
        if not len(mine):
            continue
        joined = shares.merge(mine, left_on=["gate", "expert"], right_on=["gate", "column"], suffixes=("", "_map"))
        part = joined.groupby(["step", "module"], as_index=False)["share"].mean()
        parts.append(part.assign(task=task))
    if not parts:
        return pd.DataFrame(columns=["window_step", "module", "task", "share"])
    out = pd.concat(parts, ignore_index=True).rename(columns={"step": "window_step"})
    grid = pd.MultiIndex.from_product([sorted(shares["step"].unique()), columns["module"].unique(), tasks],
                                      names=["window_step", "module", "task"])
    return out.set_index(["window_step", "module", "task"]).reindex(grid, fill_value=0.0).reset_index()


def expert_conflict_table(conflict: pd.DataFrame, shares: pd.DataFrame, gates: list[dict[str, Any]],
                          tasks: list[str], mode: str = "exact") -> pd.DataFrame:
    """One row per measured conflict step x expert module x task pair (see ``COLUMNS``): the pair's cosine on the
    expert, the running count below the threshold, and each task's share in the window holding that step (the
    first window ending at or after it; the last window for later steps)."""
    modules = conflict[conflict["scope"] == "module"] if len(conflict) else conflict
    columns = expert_columns(gates, sorted(modules["name"].unique()) if len(modules) else [])
    if not len(modules) or not len(columns):
        return pd.DataFrame(columns=COLUMNS)
    label = columns.drop_duplicates("module").set_index("module")["expert"]
    rows = modules[modules["name"].isin(label.index)].copy()
    if not len(rows):
        return pd.DataFrame(columns=COLUMNS)
    rows["measured"] = rows.groupby(["task_a", "task_b", "name"])["step"].rank(method="first").astype("int64")
    per_task = task_shares(columns, shares.dropna(subset=["share"]), tasks)
    windows = np.sort(per_task["window_step"].unique()).astype(np.int64)
    if len(windows):
        at = np.minimum(np.searchsorted(windows, rows["step"].to_numpy()), len(windows) - 1)
        rows["window_step"] = windows[at]
    else:
        rows["window_step"] = pd.NA
    share = per_task.set_index(["window_step", "module", "task"])["share"]
    for side in ("a", "b"):
        keys = pd.MultiIndex.from_arrays([rows["window_step"], rows["name"], rows[f"task_{side}"]])
        rows[f"share_{side}"] = share.reindex(keys).fillna(0.0).to_numpy() if len(share) else 0.0
    first = columns.drop_duplicates("module").set_index("module")
    own = columns["task"].notna().any()
    source = np.where(first["router"], SHARED_ROUTER, SHARED_GATE) if not own else np.full(len(first), TASK_GATE)
    rows = rows.assign(mode=mode, module=rows["name"], expert=rows["name"].map(label),
                       experts=rows["name"].map(first["experts"]).astype("int64"),
                       share_source=rows["name"].map(pd.Series(source, index=first.index)))
    return rows[COLUMNS].sort_values(["step", "task_a", "task_b", "module"], ignore_index=True)


def last_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Each task pair's rows at its last measured step."""
    if not len(table):
        return table
    last = table.groupby(["mode", "task_a", "task_b"])["step"].transform("max")
    return table[table["step"] == last]
