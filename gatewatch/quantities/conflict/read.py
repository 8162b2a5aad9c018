"""Gradient conflict, read half: the ``conflict`` and ``purity`` tables, the report's ``conflict`` and
``expert_conflict`` lists, and the rules for tasks that pull shared parameters apart, for an expert both tasks
use while they fight over it (``contested_expert``), and for a gradient that became NaN/Inf.

One criterion throughout: a measured step counts as conflict when the pair's cosine is below the run's
``conflict_threshold`` (stored in run.json; 0 by default), for the Recon-style ``below`` count and for
the finding alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd

from ...declarations import Add, Page, ReadHalf, Section, table_rows
from ...rules import Finding, Thresholds, fmt, num, streak_start
from ...skipped import described_gates, entry, map_fix, unmapped, why_unmapped
from ..losses.read import first_nonfinite, nonfinite_finding
from .routing import COLUMNS, SHARED_ROUTER, TASK_GATE, expert_conflict_table, last_rows

if TYPE_CHECKING:
    from ...loaded_run import Run

TABLES: dict[str, dict[str, str]] = {
    # gradient conflict (GateWatch(conflict_every=...)): one row per conflict step x scope x name x task pair;
    # scope "param" (one shared tensor), "module" (a group of them), "all" (every shared parameter, name "all").
    # zero_grad: a task has no gradient there (cosine and magnitude_sim are then 0); below: measured steps so
    # far whose cosine fell below conflict_threshold (Recon); elements: the number of parameter elements
    "conflict": {
        "step": "int64", "scope": "string", "name": "string", "task_a": "string", "task_b": "string",
        "cosine": "float64", "sign_conflict": "float64", "norm_a": "float64", "norm_b": "float64",
        "magnitude_sim": "float64", "below": "int64", "zero_grad": "bool", "elements": "int64",
    },
    # GradDrop sign purity P = (1 + sum_k g_k / sum_k |g_k|) / 2 over all tasks: element counts per bin of [0, 1]
    # per conflict step x scope ("module" | "all") x name; elements no task touches are left out
    "purity": {"step": "int64", "scope": "string", "name": "string", "bin": "int64", "lo": "float64",
               "hi": "float64", "count": "float64"},
}

REMEDY_TEXTS = {
    "conflict": (
        "The tasks pull these shared parameters in opposite directions (negative transfer). Give the tasks their "
        "own experts where they fight (CGC/PLE task-specific experts, or make the hot-spot layers task-specific "
        "as Recon does), project the conflicting gradients (PCGrad) or align them (GradVac), or re-weight the "
        "losses (gw.remedies.UncertaintyWeighting)."
    ),
    "contested_expert": (
        "The gates send both tasks through an expert their gradients fight over, so MMoE's routing does not keep "
        "them apart there. Gate dropout (gw.remedies.GateDropout(0.1)) or PCGrad on that expert's parameters are "
        "lighter alternatives."
    ),
    "contested_router_expert": (
        "The router sends both tasks' tokens to an expert their gradients fight over, and one router cannot route "
        "the tasks apart. Condition the router on the task (a task embedding in its input, or one router per task), "
        "add task-specific experts next to the routed ones, or project the conflicting gradients (PCGrad) on that "
        "expert's slices; router dropout (gw.remedies.GateDropout on the router) is a lighter alternative."
    ),
}


def conflict_threshold(run: Run) -> float:
    """The run's ``conflict_threshold`` (Recon's S) from run.json; 0 for runs that do not record it."""
    described = run.meta.get("conflict")
    value = described.get("threshold") if isinstance(described, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def conflict_scope(run: Run, quantity: str = "conflict") -> str:
    """Which gradients the run's conflict (or its proxy, ``quantity="conflict_proxy"``) describes: ``"applied"``
    (averaged over the data-parallel ranks, what the optimizer applies) or ``"local"`` (rank 0's own batch). Runs
    recorded before the scope was stored read as ``"local"``; in one process the two are the same."""
    described = run.meta.get(quantity)
    scope = described.get("scope") if isinstance(described, dict) else None
    return scope if scope in ("applied", "local") else "local"


SCOPE_WORDS = {"applied": "the gradients the optimizer applies (averaged over the ranks)",
               "local": "rank 0's own batch"}


def scope_caption(run: Run) -> str:
    """One line saying which gradients the conflict figures describe (only when the run had several ranks)."""
    ranks = run.meta.get("world_size")
    if not isinstance(ranks, int) or ranks < 2:
        return ""
    return f"Conflict scope: {conflict_scope(run)}, {SCOPE_WORDS[conflict_scope(run)]}, over {ranks} ranks."


def conflict_findings(run: Run, th: Thresholds) -> list[Finding]:
    """One finding per task pair whose gradients point apart on shared modules in most recent measurements:
    the cosine below the run's ``conflict_threshold`` (the same criterion as the ``below`` count)."""
    limit = conflict_threshold(run)
    table = run.table("conflict")
    table = table[table["scope"].isin(["module", "all"])]
    out: list[Finding] = []
    for (a, b), rows in table.groupby(["task_a", "task_b"], sort=False):
        steps = sorted(rows["step"].unique())[-max(1, int(th.conflict_steps)):]
        if len(steps) < min(3, int(th.conflict_steps)):
            continue
        recent = rows[rows["step"].isin(steps)]
        by_name = recent.assign(against=(recent["cosine"] < limit) & ~recent["zero_grad"]).groupby(
            ["scope", "name"], sort=False, as_index=False).agg(
            share=("against", "mean"), cosine=("cosine", "mean"), sign=("sign_conflict", "mean"))
        hot = by_name[(by_name["share"] >= th.conflict_share) & (by_name["cosine"] <= th.conflict_cosine)
                      & (by_name["cosine"] < limit)].sort_values("cosine")
        if not len(hot):
            continue
        modules = hot[hot["scope"] == "module"]
        worst = modules.iloc[0] if len(modules) else hot.iloc[0]
        history = rows[(rows["scope"] == worst["scope"]) & (rows["name"] == worst["name"])].sort_values("step")
        names = ", ".join(map(str, modules["name"].iloc[:3])) + (", ..." if len(modules) > 3 else "")
        where = (f"{len(modules)} of {int((by_name['scope'] == 'module').sum())} shared modules ({names})"
                 if len(modules) else "the shared parameters as a whole")
        overall = by_name.loc[by_name["scope"] == "all", "cosine"]
        tail = f"; over all shared parameters the mean cosine is {overall.iloc[0]:.2f}" if len(overall) else ""
        out.append(Finding(
            "conflict", "warning", None, None, streak_start(history["step"], history["cosine"] < limit),
            f"tasks {a!r} and {b!r} pull against each other on {where}: on {worst['name']} the gradient cosine "
            f"was below {limit:g} in {worst['share']:.0%} of the last {len(steps)} measured steps (mean "
            f"{worst['cosine']:.2f}, {worst['sign']:.0%} of the elements with opposite signs){tail}.",
            REMEDY_TEXTS["conflict"], "conflict",
        ))
    return out


def gradient_findings(run: Run, th: Thresholds) -> list[Finding]:
    """A task whose gradient on the shared parameters became NaN/Inf (non-finite norms on a conflict step)."""
    conflict = run.table("conflict")
    conflict = conflict[conflict["scope"] == "all"]
    pairs: list[tuple[object, object]] = []
    for side in ("a", "b"):
        bad = conflict[~conflict[f"norm_{side}"].astype("float64").abs().lt(math.inf)]
        pairs += list(zip(bad[f"task_{side}"], bad["step"], strict=True))
    return [nonfinite_finding("gradient", task, step) for task, step in first_nonfinite(pairs).items()]


HOT_SPOTS = 3  # modules listed per task pair in the report


def conflict_summary(run: Run, thresholds: Thresholds) -> list[dict[str, Any]]:
    """The report's ``conflict`` list: per task pair, all shared parameters at the last measured step.

    Each entry: ``tasks [a, b]``, ``step``, ``cosine``, ``sign_conflict``, ``magnitude_sim``, ``norm_a``,
    ``norm_b``, ``zero_grad``, ``below`` (measured steps with cosine below the threshold), ``measured``
    (conflict steps in the run) and ``hot_spots``: the modules where the pair's cosine fell below the
    threshold most often (``name``, ``below``, ``cosine`` at the last step).
    """
    table = run.table("conflict")
    if not len(table):
        return []
    out, scope = [], conflict_scope(run)
    for (a, b), rows in table.groupby(["task_a", "task_b"], sort=False):
        total = rows[(rows["scope"] == "all") & (rows["step"] == rows["step"].max())]
        if not len(total):
            continue
        row = total.iloc[-1]
        modules = rows[(rows["scope"] == "module") & (rows["step"] == row["step"])]
        hot = modules[modules["below"] > 0].sort_values(["below", "cosine"], ascending=[False, True])
        out.append({
            "tasks": [str(a), str(b)], "step": int(row["step"]), "cosine": num(row["cosine"]),
            "sign_conflict": num(row["sign_conflict"]), "magnitude_sim": num(row["magnitude_sim"]),
            "norm_a": num(row["norm_a"]), "norm_b": num(row["norm_b"]), "zero_grad": bool(row["zero_grad"]),
            "below": int(row["below"]), "measured": int(rows.loc[rows["scope"] == "all", "step"].nunique()),
            "hot_spots": [{"name": str(h["name"]), "below": int(h["below"]), "cosine": num(h["cosine"])}
                          for _, h in hot.head(HOT_SPOTS).iterrows()], "scope": scope,
        })
    return out


def expert_table(run: Run) -> pd.DataFrame:
    """Conflict x routing of a run: one row per measured step x expert module x task pair x mode (``exact`` from
    the ``conflict`` table, ``proxy`` from ``conflict_proxy``; see
    :func:`~gatewatch.quantities.conflict.routing.expert_conflict_table`)."""
    gates, frames = list(run.meta.get("gates") or []), []
    for mode, table in (("exact", run.table("conflict")), ("proxy", run.tables.get("conflict_proxy"))):
        if table is not None and len(table):
            table = table if "scope" in table else table.assign(scope="module")
            frames.append(expert_conflict_table(table, run.shares, gates, run.tasks, mode))
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def expert_conflict_summary(run: Run, thresholds: Thresholds) -> list[dict[str, Any]]:
    """The report's ``expert_conflict`` list: per expert (a module, or a fused expert ``<module>[i]``) and task
    pair at the pair's last measured step, the cosine, the running ``below`` count, the measured steps, each
    task's share (``window_step``: its window), the gate's expert count ``experts`` and ``share_source``: "task
    gate", or "shared router (same for every task)" / "shared gate (same for every task)" when one gate serves
    every task, so that the tasks' shares are one and the same."""
    out, scopes = [], {"exact": conflict_scope(run), "proxy": conflict_scope(run, "conflict_proxy")}
    for _, r in last_rows(expert_table(run)).iterrows():
        a, b = str(r["task_a"]), str(r["task_b"])
        out.append({
            "expert": str(r["expert"]), "module": str(r["module"]), "tasks": [a, b], "mode": str(r["mode"]),
            "cosine": num(r["cosine"]), "below": int(r["below"]), "measured": int(r["measured"]),
            "share": {a: num(r["share_a"]) or 0.0, b: num(r["share_b"]) or 0.0}, "step": int(r["step"]),
            "window_step": None if pd.isna(r["window_step"]) else int(r["window_step"]),
            "experts": int(r["experts"]), "share_source": str(r["share_source"]), "scope": scopes[str(r["mode"])],
        })
    return out


def contested_floor(th: Thresholds, experts: int) -> float:
    """The share both tasks must give an expert of a gate of ``experts`` columns for it to count as contested."""
    return max(th.contested_share, th.contested_even / max(experts, 1))


def contested_findings(run: Run, th: Thresholds) -> list[Finding]:
    """An expert both tasks of a pair use substantially (each share at least ``contested_even`` / E and
    ``contested_share`` in the last window) while their gradients on it conflict in most recent measured steps
    (``contested_below``). On a sparse router the share is the router's, the same for every task."""
    limit = conflict_threshold(run)
    table = expert_table(run)
    if (table["mode"] == "exact").any():
        table = table[table["mode"] == "exact"]  # the proxy speaks only where nothing exact was measured
    out: list[Finding] = []
    for (a, b, module), rows in table.groupby(["task_a", "task_b", "module"], sort=False):
        rows = rows.sort_values("step")
        recent = rows.tail(max(1, int(th.conflict_steps)))
        if len(recent) < min(3, int(th.conflict_steps)):
            continue
        against = (recent["cosine"] < limit) & ~recent["zero_grad"].astype(bool)
        last = recent.iloc[-1]
        used = min(last["share_a"], last["share_b"])
        floor = contested_floor(th, int(last["experts"]))
        if against.mean() < th.contested_below or used < floor:
            continue
        expert, shared = str(last["expert"]), last["share_source"] != TASK_GATE
        share = (f"the {last['share_source'].split(' (')[0]} gives it {last['share_a']:.0%} of the weight "
                 f"(the same for every task)" if shared else
                 f"mean gate share {last['share_a']:.0%} and {last['share_b']:.0%}")
        router = last["share_source"] == SHARED_ROUTER
        out.append(Finding(
            "contested_expert", "warning", None, None,
            streak_start(rows["step"], (rows["cosine"] < limit) & ~rows["zero_grad"].astype(bool)),
            f"expert {expert} ({module}) is contested by tasks {a!r} and {b!r}: both route to it ({share} in the "
            f"window of step {last['window_step']}; an even share is {1 / max(int(last['experts']), 1):.0%}) while "
            f"their gradients on it conflict: cosine below {limit:g} in {against.mean():.0%} of the last "
            f"{len(recent)} measured steps (last {last['cosine']:.2f}, {last['mode']}).",
            REMEDY_TEXTS["contested_router_expert"] if router else
            f"Make expert {expert} task-specific (CGC/PLE: give it to {a!r} or {b!r} and let the other task use "
            f"its own) or duplicate it so each task trains its own copy. {REMEDY_TEXTS['contested_expert']}",
            "conflict", expert,
        ))
    return out


CONFLICT_SCALARS = ("cosine", "sign_conflict", "magnitude_sim")


def conflict_scalars(tables: Mapping[str, pd.DataFrame], add: Add) -> None:
    """``conflict/<a>~<b>/{cosine,sign_conflict,magnitude_sim}`` over all shared parameters,
    ``conflict/<a>~<b>/module/<module>/cosine`` and ``conflict/norm/<task>``."""
    for row in table_rows(tables, "conflict"):
        pair = f"{row.task_a}~{row.task_b}"
        if row.scope == "all":
            for metric in CONFLICT_SCALARS:
                add(f"conflict/{pair}/{metric}", getattr(row, metric), row.step)
            add(f"conflict/norm/{row.task_a}", row.norm_a, row.step)
            add(f"conflict/norm/{row.task_b}", row.norm_b, row.step)
        elif row.scope == "module":
            add(f"conflict/{pair}/module/{row.name}/cosine", row.cosine, row.step)


def conflict_text(conflict: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    lines = []
    for c in conflict:
        lines.append(f"conflict {c['tasks'][0]} ~ {c['tasks'][1]} ({c.get('scope', 'local')} gradients): cosine "
                     f"{fmt(c['cosine'])}, sign conflict {fmt(c['sign_conflict'])}")
        if c.get("hot_spots"):
            spots = ", ".join(f"{h['name']} ({h['below']} of {c['measured']} steps)" for h in c["hot_spots"])
            lines.append(f"  fighting most on: {spots}")
    return lines


def conflict_skipped(run: Run) -> list[dict[str, Any]]:
    """Conflict that turned itself off, and, while conflict or its proxy ran, the gates whose experts were not
    found (they get no ``expert_conflict`` entry)."""
    meta = run.meta
    conflict = meta.get("conflict") if isinstance(meta.get("conflict"), dict) else None
    out = []
    if conflict is not None and conflict.get("disabled"):
        out.append(entry("conflict", None, str(conflict["disabled"])))
    if (conflict is not None and not conflict.get("disabled")) or isinstance(meta.get("conflict_proxy"), dict):
        out += [entry("expert_conflict", g["name"], why_unmapped(g), map_fix(g))
                for g in described_gates(meta) if unmapped(g)]
    return out


QUANTITY = ReadHalf(
    tables=TABLES, measured=("conflict",), scalars=conflict_scalars, skipped=conflict_skipped,
    sections=(Section("conflict", conflict_summary, conflict_text),
              Section("expert_conflict", expert_conflict_summary)),
    rules=(conflict_findings, gradient_findings, contested_findings), remedy_texts=REMEDY_TEXTS,
    pages=(Page("conflict", "Conflict", ":material/compare_arrows:", "gatewatch.app.views.conflict", 50,
                "?run=polarized", 6),),
    figures=("gatewatch.figures.conflict",),
)
