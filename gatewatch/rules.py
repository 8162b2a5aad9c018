"""What a finding rule is made of: :class:`Finding`, :class:`Thresholds` and the helpers rules share.

A rule is a pure function ``(run, thresholds) -> list[Finding]`` over a :class:`~gatewatch.loaded_run.Run`'s
tables (pandas only, no torch). Each quantity's read half (``gatewatch.quantities.<name>.read``)
declares its rules and remedies; :func:`gatewatch.findings.find` runs them all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from .loaded_run import Run

SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def _th(default: float, help: str) -> float:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Thresholds:
    """Where each rule fires. All are fractions unless said otherwise; ``help(name)`` says what each one means."""

    collapse_share: float = _th(0.9, "polarization: the task's mean gate puts at least this much weight on one "
                                     "expert")
    sharp_samples: float = _th(0.5, "sharp routing (info): share of samples whose top weight reaches the watch's "
                                    "threshold")
    dead_fraction: float = _th(0.1, "dead expert: utilization below this fraction of an even split (1/E)")
    collapse_experts: float = _th(0.25, "collapse: at most this fraction of the experts holds 90% of the "
                                        "utilization")
    independent_spread: float = _th(0.01, "input-independent gate: mean per-expert spread of the weights across "
                                          "samples below this")
    independent_mi: float = _th(0.01, "input-independent gate: input-expert mutual information (normalised) below "
                                      "this")
    unstable_drift: float = _th(0.05, "unstable gate: Jensen-Shannon drift between windows (bits) above this")
    unstable_windows: float = _th(0.3, "unstable gate: in at least this share of the second half's windows")
    conflict_share: float = _th(0.6, "task conflict: gradient cosine below the run's conflict_threshold in at "
                                     "least this share of the recent conflict steps")
    conflict_steps: float = _th(10, "task conflict: how many of the last measured conflict steps are looked at "
                                    "(a count)")
    conflict_cosine: float = _th(-0.1, "task conflict: the mean recent cosine must be at or below this (cosines "
                                       "near 0 are noise)")
    router_max_violation: float = _th(1.0, "imbalanced router layer: MaxVio (max dispatch load / mean load - 1) "
                                           "above this")
    router_imbalanced_share: float = _th(0.6, "imbalanced router layer: in at least this share of the recent "
                                              "windows")
    router_windows: float = _th(10, "router findings: how many of the last windows are looked at (a count)")
    contested_even: float = _th(0.8, "contested expert: both tasks' gates (or the shared router) give the expert "
                                     "at least this multiple of an even share 1/E in the last window (0.8: 0.2 at "
                                     "E=4, 0.1 at E=8)")
    contested_share: float = _th(0.0, "contested expert: an absolute floor on both tasks' mean share, on top of "
                                      "contested_even (0: none)")
    contested_below: float = _th(0.6, "contested expert: the pair's cosine on the expert is below the run's "
                                      "conflict_threshold in at least this share of its last conflict_steps "
                                      "measured steps")
    redundant_cka: float = _th(0.97, "redundant experts: linear CKA of two experts' outputs at or above this in "
                                     "each recent similarity measurement (healthy sample runs reach 0.94)")
    redundant_steps: float = _th(3, "redundant experts: how many of the last similarity measurements are looked "
                                    "at (a count)")
    groups_overlap_margin: float = _th(0.005, "groups overlap: a shared gate's specialisation I(G;E)/H(G) stays less "
                                             "than this above its shuffled-label baseline in each recent window")
    seesaw_evals: float = _th(6, "seesaw: how many of each task's last validation evaluations the trend is fitted "
                                 "on (a count, at least 3)")
    seesaw_se: float = _th(2.0, "seesaw: a trend counts when its slope is at least this many standard errors from "
                                "0 (a count of SE)")

    @classmethod
    def from_dict(cls, values: dict[str, float]) -> Thresholds:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown thresholds {unknown}; known: {sorted(known)}.")
        return cls(**{k: float(v) for k, v in values.items()})

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def help(cls, name: str) -> str:
        """What the threshold ``name`` means."""
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)


@dataclass(frozen=True)
class Finding:
    """One thing wrong (or worth knowing) about a run."""

    code: str
    severity: str  # "error" | "warning" | "info"
    gate: str | None
    task: str | None
    step: int
    message: str
    remedy: str
    chart: str  # the dashboard page that shows it: a quantity's page ("gates", "experts", "routers", "conflict"...)
    # or "overview" (gatewatch.app.state.finding_link)
    expert: str | None = None  # the expert concerned, for expert findings
    value: float | None = None  # how bad it is, larger is worse (dead experts, MaxVio ...): ranks one code's findings
    unit: str | None = None  # what ``value`` counts, e.g. "of 128 experts dead": the text report's grouped line

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def streak_start(steps: pd.Series, condition: pd.Series) -> int:
    """The first step of the final run of consecutive True values (steps in order)."""
    start = int(steps.iloc[-1])
    for step, ok in zip(steps.iloc[::-1], condition.iloc[::-1], strict=True):
        if not ok:
            break
        start = int(step)
    return start


def gate_unit(run: Run) -> str:
    """What the gates of a run stand for: ``"task"`` (multi-task models), or ``"layer"`` when there are several
    gates and none belongs to a task (sparse MoE routers, one gate per layer; each owns its experts)."""
    described = [g for g in run.meta.get("gates") or [] if isinstance(g, dict)]
    tasks = [g.get("task") for g in described] or run.gates.drop_duplicates("gate")["task"].tolist()
    return "layer" if len(tasks) > 1 and all(t is None or pd.isna(t) for t in tasks) else "task"


def who(run: Run, name: str, task: str | None) -> str:
    """How a message names a gate: by its task, or as a layer of a sparse model."""
    if task:
        return f"task {task!r} (gate {name!r})"
    return f"layer {name!r}" if gate_unit(run) == "layer" else f"gate {name!r}"


def num(x: object) -> float | None:
    """A JSON-safe float for reports (NaN, Inf and non-numbers become None)."""
    try:
        value = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if value != value or value in (float("inf"), float("-inf")) else value


def fmt(x: float | None) -> str:
    """A report number for the terminal: three decimals, ``nan`` for None."""
    return "  nan" if x is None else f"{x:.3f}"


def fmt_list(values: list[float | None]) -> str:
    """Report numbers for the terminal, two decimals each, space-separated."""
    return " ".join(f"{v:.2f}" if v is not None else " nan" for v in values)
