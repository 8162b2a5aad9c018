"""A run's summary: the small ``summary.json`` that lets a folder of thousands of runs be listed quickly.

The run-directory sink writes it at each flush and at close (atomically, like every file of a run):
the run's status and liveness fields, steps, tasks, gates, the configuration, the findings by code and
severity, and the last window's headline numbers. Listing runs reads this file only; a run without one
(written before summaries, or the committed sample runs) is summarised from a full read with
:func:`summary_from_run`. No torch, no reading of tables here: the writer builds it from what it holds.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from .loaded_run import Run
from .rules import SEVERITY_ORDER

SUMMARY_FILE = "summary.json"
SUMMARY_FORMAT = "gatewatch-summary/1"
MAX_SUMMARY_BYTES = 4 * 2**20
# run.json fields copied as they are (liveness needs host, pid, pid_start, heartbeat, flush_secs, step_time)
META_FIELDS = ("name", "status", "created", "updated", "ended", "error", "steps", "tasks", "model_class", "host",
               "pid", "pid_start", "heartbeat", "flush_secs", "step_time", "world_size")
HEADLINE = ("polarization", "effective_experts", "entropy", "top_share")  # per gate, from the gates table


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def headline(gates: pd.DataFrame, losses: pd.DataFrame) -> dict[str, Any]:
    """The last window's numbers: ``{"step", "gates": {gate: {metric: value}}, "losses": {task: loss}}``."""
    out: dict[str, Any] = {"step": None, "gates": {}, "losses": {}}
    if len(gates):
        last = gates[gates["step"] == gates["step"].max()]
        out["step"] = int(last["step"].iloc[0])
        out["gates"] = {str(r["gate"]): {m: _number(r[m]) for m in HEADLINE} for _, r in last.iterrows()}
    if len(losses):
        last = losses[losses["step"] == losses["step"].max()]
        out["losses"] = {str(t): _number(v) for t, v in last.groupby("task")["loss"].mean().items()}
    return out


def digest(findings: Iterable[Mapping[str, Any]], step: int | None) -> dict[str, Any]:
    """Findings by code and severity: ``{"step", "counts": {code: {severity: n}}, "items": [...]}``."""
    items = [{k: f.get(k) for k in ("code", "severity", "gate", "task", "step")} for f in findings]
    counts: dict[str, dict[str, int]] = {}
    for (code, severity), n in Counter((str(i["code"]), str(i["severity"])) for i in items).items():
        counts.setdefault(code, {})[severity] = n
    return {"step": step, "counts": counts, "items": items}


def build_summary(meta: Mapping[str, Any], head: Mapping[str, Any] | None,
                  findings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The summary of a run from its run.json fields, its last window's headline and its findings digest."""
    gates = [{"name": g.get("name"), "task": g.get("task"), "experts": g.get("experts")}
             for g in meta.get("gates") or [] if isinstance(g, Mapping)]
    return {
        "format": SUMMARY_FORMAT, **{k: meta.get(k) for k in META_FIELDS}, "gates": gates,
        "config": meta.get("user_config") or {}, "watch_config": meta.get("config") or {},
        "findings": dict(findings) if findings is not None else None,
        "headline": dict(head) if head is not None else headline(pd.DataFrame(), pd.DataFrame()),
    }


def summary_from_run(run: Run, findings: Iterable[Any]) -> dict[str, Any]:
    """The summary of a run read in full (runs without ``summary.json``); ``findings`` are Findings or dicts."""
    dicts = [f if isinstance(f, Mapping) else f.to_dict() for f in findings]
    return build_summary(run.meta, headline(run.gates, run.losses), digest(dicts, run.steps))


def read_summary(path: str | Path) -> dict[str, Any] | None:
    """``summary.json`` of a run directory, or None when it is missing, unreadable, of another format, or older
    than run.json (which the writer never leaves: run.json was rewritten without it, by hand or an older writer)."""
    file = Path(path) / SUMMARY_FILE
    try:
        stat = file.stat()
        if file.is_symlink() or stat.st_size > MAX_SUMMARY_BYTES:
            return None
        if stat.st_mtime_ns < (Path(path) / "run.json").stat().st_mtime_ns:
            return None
        out = json.loads(file.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return out if isinstance(out, dict) and out.get("format") == SUMMARY_FORMAT else None


def flat_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config values as ``{"a.b": value}``, scalars only (lists become strings)."""
    out: dict[str, Any] = {}
    if not isinstance(config, Mapping):
        return out
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        elif value is None or isinstance(value, (str, int, float, bool)):
            out[name] = value
    return out


def worst_severity(summary: Mapping[str, Any]) -> str:
    """``error``, ``warning``, ``info``, ``healthy`` (no finding) or ``unknown`` (findings not evaluated yet)."""
    found = summary.get("findings")
    if not isinstance(found, Mapping) or not isinstance(found.get("counts"), Mapping):
        return "unknown"
    severities = {s for by in found["counts"].values() if isinstance(by, Mapping) for s in by}
    return min(severities, key=lambda s: SEVERITY_ORDER.get(s, 3)) if severities else "healthy"
