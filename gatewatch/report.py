"""The health report of a run: the JSON object of ``gatewatch report --json`` and its text form.

Schema (stable; other tools build on it)::

    {"run": str, "path": str, "status": "live"|"finished"|"cut off", "steps": int, "tasks": [str],
     "unit": "task"|"layer",       # "layer": several gates and none has a task (sparse routers, one per layer)
     "gates": [{"name", "task", "level", "experts", "expert_names", "expert_share": [float]*E,
                "entropy", "polarization", "max_weight", "top_share", "effective_experts",
                "mutual_info", "step"}],                                  # the last window of each gate
     "balance": [{"gate", "top_k", "expert_names", "load": [float]*E, "load_cv", "dead": [str],
                  "small_margin", "step"}],               # per gate (layer) load balance, see gate_balance()
     "experts": {"names": [str], "utilization": [float], "dead": [int], "load_cv": float},
     "conflict": [{"tasks": [a, b], "cosine": float, "sign_conflict": float, "magnitude_sim", "norm_a", "norm_b",
                   "zero_grad", "below", "measured", "step", "hot_spots": [{"name", "below", "cosine"}]}],
                                            # per task pair, all shared parameters, last conflict step
     "findings": [{"code", "severity", "gate", "task", "expert", "step", "message", "remedy", "chart"}],
     "thresholds": {...}, "problems": [str]}

``entropy`` and ``mutual_info`` are normalised by log E into [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd

from .findings import Finding, Thresholds, find, gate_unit
from .runs import Run

# Extra sections: name -> function(run) -> JSON-safe value (the conflict module registers "conflict").
SECTIONS: dict[str, Callable[[Run], Any]] = {}


def _num(x: Any) -> float | None:
    """A JSON-safe float (NaN becomes null)."""
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) or math.isinf(value) else value


def last_windows(run: Run) -> list[tuple[str, pd.Series, pd.DataFrame]]:
    """Each gate's last window with samples: (name, its ``gates`` row, its ``shares`` rows by expert), in run.json's
    gate order."""
    gates = run.gates.dropna(subset=["samples"])
    gates = gates[gates["samples"] > 0]
    if not len(gates):
        return []
    last = gates.sort_values("step").groupby("gate", sort=False).tail(1).set_index("gate")
    shares = run.shares
    out = []
    for name in [n for n in run.gate_names if n in last.index] + [n for n in last.index if n not in run.gate_names]:
        row = last.loc[name]
        mine = shares[(shares["gate"] == name) & (shares["step"] == row["step"])]
        out.append((name, row, mine.sort_values("expert")))
    return out


def gate_summaries(run: Run) -> list[dict[str, Any]]:
    """The last window of each gate, in run.json's gate order."""
    out = []
    for name, row, sh in last_windows(run):
        out.append({
            "name": name, "task": None if pd.isna(row["task"]) else str(row["task"]), "level": int(row["level"]),
            "experts": int(row["experts"]), "expert_names": sh["expert_name"].astype(str).tolist(),
            "expert_share": [_num(v) for v in sh["share"]], "entropy": _num(row["entropy"]),
            "polarization": _num(row["polarization"]), "max_weight": _num(row["max_weight"]),
            "top_share": _num(row["top_share"]), "effective_experts": _num(row["effective_experts"]),
            "mutual_info": _num(row["mutual_info"]), "step": int(row["step"]),
        })
    return out


def gate_balance(run: Run, thresholds: Thresholds) -> list[dict[str, Any]]:
    """Load balance of each gate's own experts in its last window: per layer for sparse routers.

    ``load`` is, per expert, the share of tokens that pick it among their top k for a router (``top_k`` set;
    the shares add up to k), the mean gate weight otherwise; ``load_cv`` is its coefficient of variation;
    ``dead`` names the experts whose mean weight is below ``dead_fraction`` of an even split; ``small_margin``
    is the share of tokens whose k-th and (k+1)-th weights are closer than the watch's margin (routers only).
    """
    top_k = {g["name"]: g.get("top_k") for g in run.meta.get("gates") or [] if isinstance(g, dict) and "name" in g}
    out = []
    for name, row, sh in last_windows(run):
        routed = bool(top_k.get(name)) and bool(sh["selected"].notna().all())
        load = sh["selected"] if routed else sh["share"]
        mean = load.mean()
        dead = sh["share"] < thresholds.dead_fraction / max(len(sh), 1)
        out.append({
            "gate": name, "top_k": top_k.get(name), "expert_names": sh["expert_name"].astype(str).tolist(),
            "load": [_num(v) for v in load], "load_cv": _num(load.std(ddof=0) / mean) if mean > 0 else None,
            "dead": sh.loc[dead, "expert_name"].astype(str).tolist(), "small_margin": _num(row["small_margin"]),
            "step": int(row["step"]),
        })
    return out


def expert_summary(run: Run, thresholds: Thresholds) -> dict[str, Any]:
    """Utilization of each expert in the last window, the dead ones, and the load's coefficient of variation."""
    experts = run.experts.dropna(subset=["utilization"])
    if not len(experts):
        return {"names": [], "utilization": [], "dead": [], "load_cv": None}
    last = experts[experts["step"] == experts["step"].max()].reset_index(drop=True)
    util = last["utilization"]
    dead = last.index[util < thresholds.dead_fraction * last["reference"]].tolist()
    mean = util.mean()
    return {
        "names": last["expert"].astype(str).tolist(), "utilization": [_num(v) for v in util],
        "dead": [int(i) for i in dead], "load_cv": _num(util.std(ddof=0) / mean) if mean > 0 else None,
    }


def build_report(
    run: Run, thresholds: Thresholds | None = None, findings: list[Finding] | None = None
) -> dict[str, Any]:
    """The report dict of a run (see the module docstring for the schema)."""
    th = thresholds or Thresholds()
    found = find(run, th) if findings is None else findings
    report: dict[str, Any] = {
        "run": run.name, "path": str(run.path), "status": run.status, "steps": run.steps, "tasks": run.tasks,
        "unit": gate_unit(run), "gates": gate_summaries(run), "balance": gate_balance(run, th),
        "experts": expert_summary(run, th), "conflict": [],
        "findings": [f.to_dict() for f in found], "thresholds": th.to_dict(), "problems": list(run.problems),
    }
    for key, section in SECTIONS.items():
        report[key] = section(run)
    return report


def render_text(report: dict[str, Any]) -> str:
    """The report for a terminal."""
    layers = report.get("unit") == "layer"
    lines = [f"gatewatch report: {report['run']}  ({report['status']}, {report['steps']} steps)",
             f"  tasks: {', '.join(report['tasks']) or '-'}", "", f"{'layers' if layers else 'gates'} (last window):"]
    for g in report["gates"]:
        share = " ".join(f"{v:.2f}" if v is not None else " nan" for v in g["expert_share"])
        task = "" if layers else f"task={g['task'] or '-':<10} "
        lines.append(
            f"  {g['name']:<16} {task}entropy={_fmt(g['entropy'])} "
            f"polarized={_fmt(g['polarization'])} top_share={_fmt(g['top_share'])}  share=[{share}]"
        )
    for b in report.get("balance", []):
        if b["top_k"]:
            load = " ".join(f"{v:.2f}" if v is not None else " nan" for v in b["load"])
            lines.append(f"  {b['gate']:<16} top-{b['top_k']} tokens=[{load}] load CV {_fmt(b['load_cv'])}, "
                         f"small margin {_fmt(b['small_margin'])}, dead: {', '.join(b['dead']) or 'none'}")
    ex = report["experts"]
    if ex["names"]:
        util = " ".join(f"{n}:{_fmt(u)}" for n, u in zip(ex["names"], ex["utilization"], strict=True))
        lines += ["", f"experts: {util}", f"  load CV {_fmt(ex['load_cv'])}, dead: {ex['dead'] or 'none'}"]
    for c in report["conflict"]:
        lines.append(f"conflict {c['tasks'][0]} ~ {c['tasks'][1]}: cosine {_fmt(c['cosine'])}, "
                     f"sign conflict {_fmt(c['sign_conflict'])}")
        if c.get("hot_spots"):
            spots = ", ".join(f"{h['name']} ({h['below']} of {c['measured']} steps)" for h in c["hot_spots"])
            lines.append(f"  fighting most on: {spots}")
    lines += ["", f"findings ({len(report['findings'])}):"]
    if not report["findings"]:
        lines.append("  none: the gates look healthy.")
    for f in report["findings"]:
        lines += [f"  [{f['severity'].upper()}] {f['code']} at step {f['step']}: {f['message']}",
                  f"      remedy: {f['remedy']}"]
    for p in report["problems"]:
        lines.append(f"  note: {p}")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "  nan" if x is None else f"{x:.3f}"
