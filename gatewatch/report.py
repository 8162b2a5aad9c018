"""The health report of a run: the JSON object of ``gatewatch report --json`` and its text form.

Schema (stable; other tools build on it)::

    {"run": str, "path": str, "status": "live"|"finished"|"cut off", "steps": int, "tasks": [str],
     "unit": "task"|"layer",       # "layer": several gates and none has a task (sparse routers, one per layer)
     "gates": [{"name", "task", "level", "experts", "expert_names", "expert_share": [float]*E,
                "entropy", "polarization", "max_weight", "top_share", "effective_experts",
                "mutual_info", "step"}],                                  # the last window of each gate
     "balance": [{"gate", "top_k", "expert_names", "load": [float]*E, "load_cv", "dead": [str],
                  "small_margin", "step", "max_violation", "dropped": [float]*E|null, "bias": [float]*E|null,
                  "bias_changed"}],   # per gate (layer) load balance; routers: the dispatch view, see router_balance()
     "experts": {"names": [str], "utilization": [float], "dead": [int], "load_cv": float},
     "conflict": [{"tasks": [a, b], "cosine": float, "sign_conflict": float, "magnitude_sim", "norm_a", "norm_b",
                   "zero_grad", "below", "measured", "step", "hot_spots": [{"name", "below", "cosine"}]}],
                                            # per task pair, all shared parameters, last conflict step
     "expert_conflict": [{"expert", "module", "tasks": [a, b], "mode": "exact"|"proxy", "cosine", "below",
                          "measured", "share": {a: float, b: float}, "step", "window_step"}],
                                            # per expert module and task pair (docs/conflict.md)
     "guard": [{"step", "rule", "gate", "action", "rate", "why", "before", "after"}],  # the online guard's actions
     "similarity": {pool: {"step", "mean_cka", "max_cka", "most_similar": [a, b]}},   # last similarity step
     "seesaw": [{"task", "metric", "slope", "se", "first_step", "last_step", "evaluations",
                 "trend": "improving"|"worsening"|"flat"}],   # each task's recent validation trend
     "findings": [{"code", "severity", "gate", "task", "expert", "step", "message", "remedy", "chart"}],
     "thresholds": {...}, "problems": [str],
     "skipped": [{"view", "gate", "reason", "fix"}],   # views that could not be computed (quantities/skipped_views)
     "coverage": {"first_step": int|null, "last_step": int|null, "skipped_files": [str]}}
                                            # the steps the readable windows cover; files left out

``entropy`` and ``mutual_info`` are normalised by log E into [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .findings import Finding, Thresholds, find
from .quantities.skipped_views import skipped_lines, skipped_views
from .registry import Gathered
from .rules import gate_unit

if TYPE_CHECKING:
    from .loaded_run import Run

WINDOWED = ("gates", "losses", "conflict", "eval")  # tables whose rows are measurements of the run

SECTIONS: Mapping[str, Callable[[Run, Thresholds], Any]] = Gathered("SECTIONS")  # report keys of the quantities


def build_report(
    run: Run, thresholds: Thresholds | None = None, findings: list[Finding] | None = None
) -> dict[str, Any]:
    """The report dict of a run (see the module docstring for the schema)."""
    th = thresholds or Thresholds()
    found = find(run, th) if findings is None else findings
    report: dict[str, Any] = {
        "run": run.name, "path": str(run.path), "status": run.status, "steps": run.steps, "tasks": run.tasks,
        "unit": gate_unit(run),
    }
    report.update({key: section(run, th) for key, section in SECTIONS.items()})
    report.update(findings=[f.to_dict() for f in found], thresholds=th.to_dict(), problems=list(run.problems),
                  coverage=coverage(run), skipped=skipped_views(run))
    return report


def coverage(run: Run) -> dict[str, Any]:
    """What the run's readable windows cover: their first and last step (None when there is none), and the
    files that were skipped (unreadable, or parts of a flush cut short)."""
    steps = [int(s) for name in WINDOWED for s in (run.table(name)["step"].min(), run.table(name)["step"].max())
             if len(run.table(name))]
    skipped = [p.split(": ", 1)[0] for p in run.problems if p.endswith("skipped")]
    return {"first_step": min(steps, default=None), "last_step": max(steps, default=None), "skipped_files": skipped}


def no_data_reason(report: dict[str, Any]) -> str | None:
    """Why a run has no readable window (None when it has some): nothing flushed yet, or unreadable files."""
    if report["coverage"]["first_step"] is not None:
        return None
    files = report["coverage"]["skipped_files"]
    if files:
        return f"no readable window: these files could not be read: {', '.join(files)}"
    return ("no readable window: nothing was flushed yet (a watch writes every flush_every steps or flush_secs "
            "seconds, and at close); run `gatewatch report` again once the run has flushed")


def render_text(report: dict[str, Any]) -> str:
    """The report for a terminal."""
    layers = report.get("unit") == "layer"
    cov = report.get("coverage") or {}
    covers = (f"windows of steps {cov['first_step']}..{cov['last_step']}" if cov.get("first_step") is not None
              else "no readable window")
    skipped = f", {len(cov['skipped_files'])} file(s) skipped" if cov.get("skipped_files") else ""
    lines = [f"gatewatch report: {report['run']}  ({report['status']}, {report['steps']} steps)",
             f"  tasks: {', '.join(report['tasks']) or '-'}", f"  covers: {covers}{skipped}", "",
             f"{'layers' if layers else 'gates'} (last window):"]
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
                         f"small margin {_fmt(b['small_margin'])}, dead: {', '.join(b['dead']) or 'none'}"
                         + (f", MaxVio {_fmt(b['max_violation'])}" if b.get("max_violation") is not None else ""))
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
    lines += skipped_lines(report.get("skipped") or [])
    lines += ["", f"findings ({len(report['findings'])}):"]
    if not report["findings"]:
        lines.append("  none: the gates look healthy." if cov.get("first_step") is not None or not cov else
                     "  none, but there is nothing to judge yet: no window was read.")
    for f in report["findings"]:
        lines += [f"  [{f['severity'].upper()}] {f['code']} at step {f['step']}: {f['message']}",
                  f"      remedy: {f['remedy']}"]
    for p in report["problems"]:
        lines.append(f"  note: {p}")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "  nan" if x is None else f"{x:.3f}"
