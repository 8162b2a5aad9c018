"""Rules that turn a run's tables into findings in plain words, each with its remedy.

Pure pandas: ``find(run, Thresholds()) -> list[Finding]``. Every rule looks at the last window for
"what is the state now" and reports the step where the current streak of the condition began.

Two different things hide behind "a sharp gate" (see DOMAIN.md) and get different codes:

* ``polarization`` (error): the task's *mean* gate puts at least ``collapse_share`` on one expert;
  MMoE has degenerated into one tower for that task (YouTube's "gating network polarization");
* ``sharp_routing`` (info): most samples are routed confidently, but to different experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import pandas as pd

from .runs import Run

SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}

REMEDIES = {
    "polarization": (
        "Drop gate outputs while training: gw.remedies.GateDropout(0.1) masks 10% of experts per sample and "
        "renormalises (YouTube's fix, which removed polarization for all gates). Softening the gate helps "
        "too: a softmax temperature above 1, LayerNorm inside the gate, or a smaller gate init."
    ),
    "sharp_routing": (
        "Usually healthy: the gate specialises. If one expert's failure would hurt, gate dropout "
        "(gw.remedies.GateDropout(0.1)) makes routing more robust; check the Ablations page."
    ),
    "collapse": (
        "A few experts carry every task. Use gate dropout (gw.remedies.GateDropout(0.1)), a smaller gate init "
        "or a softmax temperature above 1 to spread the weight, or give tasks their own experts (CGC/PLE)."
    ),
    "dead_expert": (
        "Gate dropout routes samples through the expert again; a smaller gate init or a temperature above 1 "
        "spreads weight early. If it never recovers, the expert can be removed."
    ),
    "input_independent": (
        "The gate gives every input the same mixture, so it learns nothing from the input. Check that the gate "
        "sees informative features, lower its weight decay or raise its learning rate; a fixed learned mixture "
        "would do the same job."
    ),
    "unstable": (
        "Lower the gate learning rate, add LayerNorm inside the gate, or stop updating the gates after a "
        "warm-up (gw.remedies.GateFreezer)."
    ),
    "nonfinite": (
        "NaN/Inf reached the gate. Check the gate logits: clip gradients, lower the learning rate, add LayerNorm "
        "inside the gate, or keep the gate in float32 under mixed precision."
    ),
    "conflict": (
        "The tasks pull these shared parameters in opposite directions (negative transfer). Give the tasks their "
        "own experts where they fight (CGC/PLE task-specific experts, or make the hot-spot layers task-specific "
        "as Recon does), project the conflicting gradients (PCGrad) or align them (GradVac), or re-weight the "
        "losses (gw.remedies.UncertaintyWeighting)."
    ),
}


@dataclass(frozen=True)
class Thresholds:
    """Where each rule fires. All are fractions unless said otherwise."""

    collapse_share: float = 0.9  # polarization: mean gate weight on one expert
    sharp_samples: float = 0.5  # sharp_routing: share of samples whose top weight >= the watch's threshold
    dead_fraction: float = 0.1  # dead expert: utilization below this fraction of 1/E
    collapse_experts: float = 0.25  # collapse: at most this fraction of the experts holds 90% of utilization
    independent_spread: float = 0.01  # input_independent: mean per-expert std of the gate across samples
    independent_mi: float = 0.01  # ... and input-expert mutual information (normalised)
    unstable_drift: float = 0.05  # unstable: Jensen-Shannon drift between windows (bits)
    unstable_windows: float = 0.3  # ... in at least this share of the second half's windows
    conflict_share: float = 0.6  # conflict: gradient cosine < 0 in at least this share of
    conflict_steps: float = 10  # ... the last this many measured conflict steps (a count)
    conflict_cosine: float = -0.1  # ... with a mean cosine at or below this (near-0 cosines are noise)

    @classmethod
    def from_dict(cls, values: dict[str, float]) -> Thresholds:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown thresholds {unknown}; known: {sorted(known)}.")
        return cls(**{k: float(v) for k, v in values.items()})

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


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
    chart: str  # the dashboard page/chart that shows it: "gates", "experts", "conflict"
    expert: str | None = None  # the expert concerned, for expert findings

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


def _who(run: Run, name: str, task: str | None) -> str:
    if task:
        return f"task {task!r} (gate {name!r})"
    return f"layer {name!r}" if gate_unit(run) == "layer" else f"gate {name!r}"


def _gate_findings(run: Run, th: Thresholds) -> list[Finding]:
    out: list[Finding] = []
    gates = run.gates.dropna(subset=["samples"])
    gates = gates[gates["samples"] > 0]
    shares = run.shares
    for name, g in gates.groupby("gate", sort=False):
        g = g.sort_values("step")
        last = g.iloc[-1]
        task = None if pd.isna(last["task"]) else str(last["task"])
        who = _who(run, str(name), task)
        polarized = g["top_share"] >= th.collapse_share
        if bool(polarized.iloc[-1]) and int(last["experts"]) > 1:
            top = shares[(shares["gate"] == name) & (shares["step"] == last["step"])].sort_values("share")
            expert = str(top["expert_name"].iloc[-1]) if len(top) else "?"
            meaning = ("the task uses one expert, so MMoE has degenerated into a single tower for it" if task else
                       "one expert does the work of all, and the others hardly get any gradient")
            out.append(_finding(
                "polarization", "error", name, task, streak_start(g["step"], polarized),
                f"{who} is polarized: its mean gate puts {last['top_share']:.0%} of the weight on expert {expert} "
                f"(effective experts {last['effective_experts']:.2f} of {int(last['experts'])}); {meaning}.", "gates",
            ))
        elif last["polarization"] >= th.sharp_samples and int(last["experts"]) > 1:
            sharp = g["polarization"] >= th.sharp_samples
            out.append(_finding(
                "sharp_routing", "info", name, task, streak_start(g["step"], sharp),
                f"{who} routes sharply: {last['polarization']:.0%} of samples put most of their weight on one "
                f"expert, but different samples use different experts (largest mean share {last['top_share']:.0%}, "
                f"input-expert information {last['mutual_info']:.2f}). This is specialisation, not collapse.",
                "gates",
            ))
        independent = (g["spread"] < th.independent_spread) & (g["mutual_info"] < th.independent_mi) & ~polarized
        if bool(independent.iloc[-1]) and int(last["experts"]) > 1:
            out.append(_finding(
                "input_independent", "warning", name, task, streak_start(g["step"], independent),
                f"{who} ignores its input: every sample gets almost the same weights (spread across samples "
                f"{last['spread']:.3f}, mutual information {last['mutual_info']:.3f}).", "gates",
            ))
        out += _unstable(g, name, task, who, th)
        bad = g[g["nonfinite"] > 0]
        if len(bad):
            first = bad["first_nonfinite_step"].dropna()
            step = int(first.min()) if len(first) else int(bad["step"].iloc[0])
            out.append(_finding(
                "nonfinite", "error", name, task, step,
                f"{who} produced NaN/Inf weights ({int(bad['nonfinite'].sum())} samples), first at step {step}; "
                "they were left out of the statistics.", "gates",
            ))
    return out


def _unstable(g: pd.DataFrame, name: str, task: str | None, who: str, th: Thresholds) -> list[Finding]:
    second_half = g.iloc[len(g) // 2 :]
    drift = second_half["drift"].dropna()
    if len(drift) < 4:
        return []
    jumpy = drift > th.unstable_drift
    if jumpy.mean() < th.unstable_windows:
        return []
    first = int(second_half.loc[jumpy[jumpy].index, "step"].iloc[0])
    return [_finding(
        "unstable", "warning", name, task, first,
        f"{who} keeps swinging: its mean gate moved by more than {th.unstable_drift} bits (Jensen-Shannon) between "
        f"windows in {jumpy.mean():.0%} of the second half of training.", "gates",
    )]


def _expert_findings(run: Run, th: Thresholds) -> list[Finding]:
    experts = run.experts.dropna(subset=["utilization"])
    if not len(experts):
        return []
    out: list[Finding] = []
    last_step = experts["step"].max()
    last = experts[experts["step"] == last_step]
    dead_at = experts["utilization"] < th.dead_fraction * experts["reference"]
    for name, rows in experts.assign(dead=dead_at).groupby("expert", sort=False):
        rows = rows.sort_values("step")
        if bool(rows["dead"].iloc[-1]):
            util = rows["utilization"].iloc[-1]
            out.append(_finding(
                "dead_expert", "warning", None, None, streak_start(rows["step"], rows["dead"]),
                f"expert {name} is dead: it gets {util:.2%} of the gate weight on average, far below the "
                f"{rows['reference'].iloc[-1]:.0%} of an even split, so it hardly receives any gradient.",
                "experts", expert=str(name),
            ))
    util = last["utilization"].sort_values(ascending=False)
    n = len(util)
    if n >= 3 and util.sum() > 0:
        holding = int((util.cumsum() / util.sum() < 0.9).sum()) + 1
        if holding <= max(1, math.floor(th.collapse_experts * n)):
            names = ", ".join(str(x) for x in last.loc[util.index[:holding], "expert"])
            out.append(_finding(
                "collapse", "error", None, None, int(last_step),
                f"experts have collapsed: {holding} of {n} experts ({names}) take 90% of all gate weight across "
                f"{gate_unit(run)}s; the others are idle.", "experts",
            ))
    return out


def _conflict_findings(run: Run, th: Thresholds) -> list[Finding]:
    """One finding per task pair whose gradients point apart on shared modules in most recent measurements."""
    table = run.table("conflict")
    table = table[table["scope"].isin(["module", "all"])]
    out: list[Finding] = []
    for (a, b), rows in table.groupby(["task_a", "task_b"], sort=False):
        steps = sorted(rows["step"].unique())[-max(1, int(th.conflict_steps)):]
        if len(steps) < min(3, int(th.conflict_steps)):
            continue
        recent = rows[rows["step"].isin(steps)]
        by_name = recent.assign(against=(recent["cosine"] < 0) & ~recent["zero_grad"]).groupby(
            ["scope", "name"], sort=False, as_index=False).agg(
            share=("against", "mean"), cosine=("cosine", "mean"), sign=("sign_conflict", "mean"))
        hot = by_name[(by_name["share"] >= th.conflict_share) & (by_name["cosine"] <= th.conflict_cosine)
                      & (by_name["cosine"] < 0)].sort_values("cosine")
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
        out.append(_finding(
            "conflict", "warning", None, None, streak_start(history["step"], history["cosine"] < 0),
            f"tasks {a!r} and {b!r} pull against each other on {where}: on {worst['name']} the gradient cosine was "
            f"below 0 in {worst['share']:.0%} of the last {len(steps)} measured steps (mean {worst['cosine']:.2f}, "
            f"{worst['sign']:.0%} of the elements with opposite signs){tail}.", "conflict",
        ))
    return out


NONFINITE_VALUE_REMEDY = (
    "Find what overflowed at that step: lower the learning rate, clip gradients, check the inputs and the loss "
    "for log(0) or division by zero, and keep the loss in float32 under mixed precision (a GradScaler skips "
    "such steps on its own)."
)


def _nonfinite_value_findings(run: Run, th: Thresholds) -> list[Finding]:
    """NaN/Inf in a task's loss (``nonfinite_loss`` events, else NaN window means in ``losses``) or in its
    gradient on the shared parameters (non-finite norms in ``conflict``): one finding per task and kind."""
    first: dict[tuple[str, str], int] = {}
    events = run.events[run.events["kind"] == "nonfinite_loss"]
    losses = run.losses[~run.losses["loss"].astype("float64").abs().lt(math.inf)]
    for task, step in [*zip(events["source"], events["step"], strict=True),
                       *zip(losses["task"], losses["step"], strict=True)]:
        key = ("loss", str(task))
        first[key] = min(first.get(key, int(step)), int(step))
    conflict = run.table("conflict")
    conflict = conflict[conflict["scope"] == "all"]
    for side in ("a", "b"):
        bad = conflict[~conflict[f"norm_{side}"].astype("float64").abs().lt(math.inf)]
        for task, step in zip(bad[f"task_{side}"], bad["step"], strict=True):
            key = ("gradient", str(task))
            first[key] = min(first.get(key, int(step)), int(step))
    return [
        Finding("nonfinite", "error", None, task, step,
                f"the {what} of task {task!r} became NaN/Inf at step {step}"
                + (" (a measured conflict step; it may have started earlier)." if what == "gradient" else "."),
                NONFINITE_VALUE_REMEDY, "conflict" if what == "gradient" else "overview")
        for (what, task), step in sorted(first.items(), key=lambda kv: kv[1])
    ]


def _finding(code: str, severity: str, gate: str | None, task: str | None, step: int, message: str,
             chart: str, expert: str | None = None) -> Finding:
    return Finding(code, severity, gate, task, int(step), message, REMEDIES[code], chart, expert)


RULES: list[Callable[[Run, Thresholds], list[Finding]]] = [
    _gate_findings, _expert_findings, _conflict_findings, _nonfinite_value_findings,
]


def find(run: Run, thresholds: Thresholds | None = None) -> list[Finding]:
    """All findings of a run, most severe first."""
    th = thresholds or Thresholds()
    found = [f for rule in RULES for f in rule(run, th)]
    return sorted(found, key=lambda f: (SEVERITY_ORDER[f.severity], f.step))
