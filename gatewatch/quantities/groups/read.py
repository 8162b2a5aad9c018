"""Sample groups on a shared gate, read half: per-group routing, specialisation, their report keys and findings.

Pure numpy/pandas. The capture half sums, per gate, group and window, the group's rows (``tokens``), their
affinities (``share``: the mean affinity per expert) and, for routers, their dispatch (``load``: the share of the
group's tokens dispatched to each expert, from the router's own choice; it adds up to k). From those sums:

* ``entropy`` (nats), ``top_expert`` and ``top_share`` of the group's ``share``;
* the **specialisation** of a gate, I(G; E) / H(G): the mutual information between a (group, expert) pair's
  group and expert over the window's pairs, weighted by the dispatch for routers and by the affinity for dense
  gates, divided by the groups' entropy. 0 when every group spreads over the experts alike, 1 when the expert
  reveals the group;
* its **baseline**: the same figure for labels that carry no information about the routing (each labelled
  sample, or token with ``[B, S]`` labels, given a random group drawn with the groups' frequencies so far,
  independently of its routing). With finitely many tokens the specialisation of unrelated labels is above 0;
  the baseline is what it is for the window's own routing, tokens and sequence structure.

Per-expert ``share`` and ``load`` (lists, float32) are stored in the windows that
:class:`~gatewatch.capture.per_expert.PerExpertSchedule` keeps (every window while gates x groups x experts is at
most 512; above, the first, every K-th and the run's last), or every ``group_experts_every`` windows when given;
the scalar columns every window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ...declarations import Add, Page, ReadHalf, Section, table_rows
from ...maths.gate_metrics import entropy_nats
from ...rules import Finding, Thresholds, fmt, num, streak_start

if TYPE_CHECKING:
    from ...loaded_run import Run

TABLES: dict[str, dict[str, str]] = {
    # one row per gate per group per window (groups with rows in that window); share / load: per-expert lists,
    # every group_experts_every windows and in the run's last window (null in between)
    "group_routing": {
        "step": "int64", "gate": "string", "group": "string", "tokens": "float64", "entropy": "float64",
        "top_expert": "Int64", "top_share": "float64", "share": "object", "load": "object",
    },
    # one row per gate per window with labelled rows
    "group_specialisation": {
        "step": "int64", "gate": "string", "groups": "int64", "tokens": "float64", "value": "float64",
        "baseline": "float64",
    },
}

def sums_layout(width: int, groups: int) -> int:
    """The expert count of one gate's window sums of ``width`` floats (layout of :func:`split_sums`)."""
    return (width - groups - 1) // (3 * groups)


def split_sums(s: np.ndarray, groups: int) -> dict[str, np.ndarray]:
    """One gate's window sums ``[windows, G + 3GE + 1]``: ``tokens [W, G]``, ``share``, ``load`` and ``baseline``
    (the joint of the uninformative labels) ``[W, G, E]`` and ``invalid [W]`` (rows whose label is out of range)."""
    w, g = s.shape[0], groups
    e = sums_layout(s.shape[1], g)
    block = g * e
    return {"tokens": s[:, :g], "share": s[:, g:g + block].reshape(w, g, e),
            "load": s[:, g + block:g + 2 * block].reshape(w, g, e),
            "baseline": s[:, g + 2 * block:g + 3 * block].reshape(w, g, e), "invalid": s[:, -1]}


def specialisation(joint: np.ndarray) -> np.ndarray:
    """I(G; E) / H(G) of joint weights ``[..., G, E]`` (NaN where the weights hold fewer than two groups)."""
    joint = np.asarray(joint, dtype=np.float64)
    total = joint.sum((-2, -1), keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = joint / np.where(total > 0, total, 1)
        pg, pe = p.sum(-1, keepdims=True), p.sum(-2, keepdims=True)
        terms = np.where(p > 0, p * np.log(p / (pg * pe)), 0.0)
        h = entropy_nats(pg[..., 0])
        return np.where(h > 1e-12, terms.sum((-2, -1)) / np.where(h > 1e-12, h, 1), np.nan)


def group_tables(gate: str, names: list[str], router: bool, steps: np.ndarray, sums: np.ndarray,
                 detail: np.ndarray) -> dict[str, pd.DataFrame]:
    """The ``group_routing`` and ``group_specialisation`` rows of one gate over the windows ``steps``; ``detail``
    says which windows keep the per-expert lists."""
    p = split_sums(np.asarray(sums, dtype=np.float64), len(names))
    tokens = p["tokens"]
    with np.errstate(divide="ignore", invalid="ignore"):
        share = p["share"] / np.where(tokens > 0, tokens, 1)[..., None]
        load = p["load"] / np.where(tokens > 0, tokens, 1)[..., None]
    has = tokens > 0
    wi, gi = np.nonzero(has)
    top = share.argmax(-1)
    joint = p["load"] if router else p["share"]
    keep = detail[wi]
    routing = pd.DataFrame({
        "step": steps[wi], "gate": gate, "group": np.array(names, dtype=object)[gi], "tokens": tokens[wi, gi],
        "entropy": entropy_nats(share[wi, gi]), "top_expert": top[wi, gi], "top_share": share[wi, gi, top[wi, gi]],
        "share": _lists(share[wi, gi], keep), "load": _lists(load[wi, gi], keep & router),
    })
    present = has.sum(1)
    windows = present > 0
    spec = pd.DataFrame({
        "step": steps[windows], "gate": gate, "groups": present[windows], "tokens": tokens.sum(1)[windows],
        "value": specialisation(joint)[windows], "baseline": specialisation(p["baseline"])[windows],
    })
    return {"group_routing": routing, "group_specialisation": spec}


def _lists(values: np.ndarray, keep: np.ndarray | bool) -> list[np.ndarray | None]:
    keep = np.broadcast_to(keep, len(values))
    return [v.astype(np.float32) if k else None for v, k in zip(values, keep, strict=True)]


# ---------------------------------------------------------------------------------------------- report
def _last(table: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    return table.sort_values("step", kind="stable").groupby(by, sort=False).tail(1)


def _floats(values: Any) -> list[float | None] | None:
    if values is None or (isinstance(values, float) and math.isnan(values)):
        return None
    return [num(v) for v in values]


def group_routing(run: Run, thresholds: Thresholds) -> list[dict[str, Any]]:
    """Per gate and group, the last window that keeps the per-expert lists: ``{gate, group, step, tokens, share,
    load, entropy, top_expert, top_share}`` (``load`` None for dense gates)."""
    table = run.table("group_routing")
    table = table[table["share"].notna()]
    if not len(table):
        return []
    return [{"gate": str(r["gate"]), "group": str(r["group"]), "step": int(r["step"]), "tokens": num(r["tokens"]),
             "share": _floats(r["share"]), "load": _floats(r["load"]), "entropy": num(r["entropy"]),
             "top_expert": None if pd.isna(r["top_expert"]) else int(r["top_expert"]),
             "top_share": num(r["top_share"])}
            for _, r in _last(table, ["gate", "group"]).iterrows()]


def group_specialisation(run: Run, thresholds: Thresholds) -> list[dict[str, Any]]:
    """Per gate, its last window's specialisation ``{gate, step, value, baseline, groups}``."""
    table = run.table("group_specialisation")
    return [{"gate": str(r["gate"]), "step": int(r["step"]), "value": num(r["value"]),
             "baseline": num(r["baseline"]), "groups": int(r["groups"])}
            for _, r in _last(table, ["gate"]).iterrows()]


TEXT_GATES = 8  # the text report lists each gate's specialisation up to this many gates, else a summary


def specialisation_text(entries: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    if not entries:
        return []
    groups = sorted({r["group"] for r in report.get("group_routing") or []})
    lines = ["", f"sample groups ({', '.join(groups) or 'none in the last window'}): specialisation I(G;E)/H(G), "
                 "shuffled-label baseline in brackets"]
    ok = [e for e in entries if e["value"] is not None]
    if len(entries) <= TEXT_GATES or not ok:
        lines += [f"  {e['gate']:<16} {fmt(e['value'])} ({fmt(e['baseline'])})" for e in entries]
        return lines
    ok.sort(key=lambda e: e["value"])
    mid = ok[len(ok) // 2]
    lines.append(f"  {len(entries)} gates: lowest {fmt(ok[0]['value'])} ({ok[0]['gate']}), median "
                 f"{fmt(mid['value'])}, highest {fmt(ok[-1]['value'])} ({ok[-1]['gate']}); baselines up to "
                 f"{fmt(max(e['baseline'] or 0.0 for e in ok))}")
    return lines


# ---------------------------------------------------------------------------------------------- findings
REMEDY_TEXTS = {
    "group_polarization": (
        "One group's samples lean on a single expert of a gate the groups share: that group has in effect a "
        "dense model of one expert there, and that expert's capacity is its ceiling. If it is not meant to, "
        "spread its routing: gate dropout (gw.remedies.GateDropout(0.1)) or a softmax temperature above 1 on a "
        "dense gate, a load-balancing loss (or a larger coefficient) on a router; or give the groups experts of "
        "their own (CGC/PLE)."
    ),
    "groups_overlap": (
        "The groups share the gate without specialising: each group spreads over the experts as the others do. "
        "That is fine when the groups need the same computation; when they conflict, give them room to part: "
        "task-specific experts (CGC/PLE), a gate per group (MMoE), or the group as an input of the gate."
    ),
}


def _finding(code: str, severity: str, gate: str, step: int, message: str) -> Finding:
    return Finding(code, severity, gate, None, int(step), message, REMEDY_TEXTS[code], "groups")


def group_findings(run: Run, th: Thresholds) -> list[Finding]:
    """``group_polarization``: a group puts at least ``collapse_share`` of its weight on one expert of a gate it
    shares with other groups, in the last window; ``groups_overlap``: several groups share a gate whose
    specialisation stays within ``groups_overlap_margin`` of its baseline over the last ``router_windows``
    windows."""
    routing, spec = run.table("group_routing"), run.table("group_specialisation")
    out: list[Finding] = []
    for gate, g in routing.groupby("gate", sort=False):
        last = g[g["step"] == g["step"].max()]
        if last["group"].nunique() < 2:
            continue
        polarized = last[last["top_share"] >= th.collapse_share]
        if len(polarized):
            said = ", ".join(f"{r.group!r} {r.top_share:.0%} on expert {r.top_expert}"
                             for r in polarized.itertuples(index=False))
            step = min(streak_start(g[g["group"] == r.group]["step"],
                                    g[g["group"] == r.group]["top_share"] >= th.collapse_share)
                       for r in polarized.itertuples(index=False))
            out.append(_finding("group_polarization", "warning", str(gate), step,
                                f"gate {gate!r} is polarized for {len(polarized)} of {last['group'].nunique()} groups "
                                f"sharing it: {said} (mean affinity of the group's rows)."))
    for gate, g in spec.groupby("gate", sort=False):
        recent = g.sort_values("step").dropna(subset=["value", "baseline"]).tail(int(th.router_windows))
        if len(recent) < 2 or (recent["groups"] < 2).any():
            continue
        gap = recent["value"] - recent["baseline"]
        if (gap < th.groups_overlap_margin).all():
            last = recent.iloc[-1]
            out.append(_finding("groups_overlap", "info", str(gate), int(recent["step"].iloc[0]),
                                f"the {int(last['groups'])} groups on gate {gate!r} do not specialise: its "
                                f"specialisation I(G;E)/H(G) stayed within {th.groups_overlap_margin:g} of the "
                                f"shuffled-label baseline over the last {len(recent)} windows (now "
                                f"{last['value']:.3f} against {last['baseline']:.3f})."))
    return out


# ---------------------------------------------------------------------------------------------- scalars
def group_scalars(tables: Mapping[str, pd.DataFrame], add: Add) -> None:
    """``group/<gate>/specialisation`` and ``/specialisation_baseline``; ``group/<gate>/<group>/top_share`` and
    ``/entropy``."""
    for row in table_rows(tables, "group_specialisation"):
        add(f"group/{row.gate}/specialisation", row.value, row.step)
        add(f"group/{row.gate}/specialisation_baseline", row.baseline, row.step)
    for row in table_rows(tables, "group_routing"):
        add(f"group/{row.gate}/{row.group}/top_share", row.top_share, row.step)
        add(f"group/{row.gate}/{row.group}/entropy", row.entropy, row.step)


QUANTITY = ReadHalf(
    tables=TABLES, windowed=("group_routing", "group_specialisation"), scalars=group_scalars,
    sections=(Section("group_routing", group_routing),
              Section("group_specialisation", group_specialisation, specialisation_text)),
    rules=(group_findings,), remedy_texts=REMEDY_TEXTS,
    pages=(Page("groups", "Groups", ":material/category:", "gatewatch.app.views.groups", 45,
                "?run=qwen3-moe-domains", 4),),  # specialisation heatmap and lines, share and load heatmaps
    figures=("gatewatch.figures.groups",),
)
