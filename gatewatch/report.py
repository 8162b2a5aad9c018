"""The health report of a run: the JSON object of ``gatewatch report --json`` and its text form.

Every key between ``unit`` and ``findings`` is a section that a registered quantity declares
(``ReadHalf.sections``, :mod:`gatewatch.declarations`), with its lines of the text form; a quantity installed
later adds its own keys. Schema (stable; other tools build on it)::

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
                   "zero_grad", "below", "measured", "step", "hot_spots": [{"name", "below", "cosine"}],
                   "scope": "applied"|"local"}],   # applied: averaged over the ranks; local: rank 0's batch
                                            # per task pair, all shared parameters, last conflict step
     "expert_conflict": [{"expert", "module", "tasks": [a, b], "mode": "exact"|"proxy", "cosine", "below",
                          "measured", "share": {a: float, b: float}, "step", "window_step", "scope"}],
                                            # per expert module and task pair (docs/conflict.md)
     "guard": [{"step", "rule", "gate", "action", "rate", "why", "before", "after"}],  # the online guard's actions
     "similarity": {pool: {"step", "mean_cka", "max_cka", "most_similar": [a, b]}},   # last similarity step
     "seesaw": [{"task", "metric", "slope", "se", "first_step", "last_step", "evaluations",
                 "trend": "improving"|"worsening"|"flat"}],   # each task's recent validation trend
     "findings": [{"code", "severity", "gate", "task", "expert", "step", "message", "remedy", "chart"}],
     "thresholds": {...}, "problems": [str],
     "coverage": {"first_step": int|null, "last_step": int|null, "skipped_files": [str]},
     "skipped": [{"view", "gate", "reason", "fix"}]}   # views that could not be computed, and what to pass
                                            # the steps the readable windows cover; files left out

``entropy`` and ``mutual_info`` are normalised by log E into [0, 1].
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Any

from .findings import Finding, Thresholds, find
from .layer_names import name_pattern, short_names
from .registry import declarations, sections
from .rules import gate_unit
from .skipped import skipped_lines

if TYPE_CHECKING:
    from .loaded_run import Run

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
    report.update({key: section.build(run, th) for key, section in sections().items()})
    report.update(findings=[f.to_dict() for f in found], thresholds=th.to_dict(), problems=list(run.problems),
                  coverage=coverage(run), skipped=skipped_views(run))
    return report


def skipped_views(run: Run) -> list[dict[str, Any]]:
    """The views the run could not compute, of every quantity (:mod:`gatewatch.skipped`)."""
    return [entry for _, half in declarations() if half.skipped is not None for entry in half.skipped(run)]


def covered_tables() -> list[str]:
    """The tables whose steps the coverage counts: every quantity's ``windowed`` and ``measured`` tables, and
    the ``eval`` table."""
    return [table for _, half in declarations() for table in (*half.windowed, *half.measured)] + ["eval"]


def coverage(run: Run) -> dict[str, Any]:
    """What the run's readable windows cover: their first and last step (None when there is none), and the
    files that were skipped (unreadable, or parts of a flush cut short)."""
    tables = [run.table(name)["step"] for name in covered_tables()]
    steps = [int(s) for t in tables if len(t) for s in (t.min(), t.max())]
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
    """The report for a terminal: the header, each section that has a text form (in registration order), the
    findings and the notes."""
    cov = report.get("coverage") or {}
    covers = (f"windows of steps {cov['first_step']}..{cov['last_step']}" if cov.get("first_step") is not None
              else "no readable window")
    skipped = f", {len(cov['skipped_files'])} file(s) skipped" if cov.get("skipped_files") else ""
    lines = [f"gatewatch report: {report['run']}  ({report['status']}, {report['steps']} steps)",
             f"  tasks: {', '.join(report['tasks']) or '-'}", f"  covers: {covers}{skipped}"]
    for key, section in sections().items():
        if section.text is not None and key in report:
            lines += section.text(report[key], report)
    lines += skipped_lines(report.get("skipped") or [])
    lines += ["", f"findings ({len(report['findings'])}):"]
    if not report["findings"]:
        lines.append("  none: the gates look healthy." if cov.get("first_step") is not None or not cov else
                     "  none, but there is nothing to judge yet: no window was read.")
    lines += finding_lines(report)
    for p in report["problems"]:
        lines.append(f"  note: {p}")
    return "\n".join(lines)


WRAP = 160  # the text report's lines are wrapped at this width (a word longer than that stays whole)
GROUP_FROM = 3  # findings of one code on this many gates or more are said in one group


def wrapped(text: str, first: str, rest: str) -> list[str]:
    """``text`` wrapped at :data:`WRAP` columns: the first line indented by ``first``, the others by ``rest``."""
    return textwrap.wrap(text, WRAP, initial_indent=first, subsequent_indent=rest, break_long_words=False,
                         break_on_hyphens=False) or [first.rstrip()]


def finding_lines(report: dict[str, Any]) -> list[str]:
    """The findings, most severe first. A code found on :data:`GROUP_FROM` gates or more is one group: how many
    of the run's gates (layers) it is on, the range of its ``value`` across them, the worst one's message, the
    remedy once, and the gates as a pattern. The JSON keeps every finding."""
    findings = report["findings"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for f in findings:
        groups.setdefault((f["severity"], f["code"]), []).append(f)
    gate_names = [g["name"] for g in report.get("gates") or []]
    label = short_names(gate_names) if report.get("unit") == "layer" else {}
    unit = "layers" if report.get("unit") == "layer" else "gates"
    lines: list[str] = []
    for (severity, code), group in groups.items():
        gates = list(dict.fromkeys(f["gate"] for f in group if f["gate"] is not None))
        if len(gates) < GROUP_FROM or len(gates) != len(group):
            for f in group:
                lines += wrapped(f"[{severity.upper()}] {f['code']} at step {f['step']}: {f['message']}", "  ",
                                 "      ")
                lines += wrapped(f"remedy: {f['remedy']}", "      ", "        ")
            continue
        valued = [f for f in group if f.get("value") is not None]
        worst = max(valued, key=lambda f: f["value"]) if valued else group[0]
        spread = ""
        if valued:
            lo, hi = min(f["value"] for f in valued), max(f["value"] for f in valued)
            spread = f": {lo:.3g}" + (f"-{hi:.3g}" if hi != lo else "") + (f" {worst['unit']}" if worst.get("unit")
                                                                         else "")
        where = f"{unit[:-1]} {label.get(worst['gate'], worst['gate'])}"
        total = f" of {len(gate_names)}" if gate_names else ""
        lines += wrapped(f"[{severity.upper()}] {code} in {len(gates)}{total} {unit}{spread}; worst {where} (step "
                         f"{worst['step']}): {worst['message']}", "  ", "      ")
        lines += wrapped(f"{unit}: {name_pattern(gates)}", "      ", "        ")
        lines += wrapped(f"remedy: {worst['remedy']}", "      ", "        ")
    return lines

