"""Gate statistics, read half: the tables, the report sections and the finding rules of every gate.

Pure pandas. Rules look at the last window for "what is the state now" and report the step where the
current streak of the condition began. Two different things hide behind "a sharp gate" and get
different codes:

* ``polarization`` (error): the task's *mean* gate puts at least ``collapse_share`` on one expert;
  MMoE has degenerated into one tower for that task (YouTube's "gating network polarization");
* ``sharp_routing`` (info): most samples are routed confidently, but to different experts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd

from ...declarations import Add, Page, ReadHalf, Section, per_expert_ok, table_rows
from ...layer_names import name_pattern, short_names
from ...rules import Finding, Thresholds, fmt, fmt_list, gate_unit, num, streak_start, who
from ...stats import load_cv

if TYPE_CHECKING:
    from ...loaded_run import Run

TABLES: dict[str, dict[str, str]] = {
    # one row per gate per window
    "gates": {
        "step": "int64", "gate": "string", "task": "string", "level": "int64", "experts": "int64",
        "samples": "float64", "entropy": "float64", "entropy_of_mean": "float64", "mutual_info": "float64",
        "effective_experts": "float64", "polarization": "float64", "max_weight": "float64",
        "top_share": "float64", "spread": "float64", "drift": "float64", "small_margin": "float64",
        "nonfinite": "float64", "first_nonfinite_step": "Int64",
    },
    # one row per gate per expert per window
    "shares": {
        "step": "int64", "gate": "string", "expert": "int64", "expert_name": "string", "share": "float64",
        "std": "float64", "top1": "float64", "selected": "float64",
    },
    # gate-weight histogram: one row per gate per bin per window
    "hist": {"step": "int64", "gate": "string", "bin": "int64", "lo": "float64", "hi": "float64", "count": "float64"},
    # one row per expert label per window, averaged over the gates that mix that expert
    "experts": {"step": "int64", "expert": "string", "utilization": "float64", "reference": "float64",
                "selected": "float64", "gates": "int64"},
}

REMEDY_TEXTS = {

    "polarization": (
        "YouTube (Zhao et al., RecSys 2019) removed it in distributed training with 10% gate dropout "
        "(gw.remedies.GateDropout(0.1): mask 10% of experts per sample, renormalise). gatewatch's census "
        "experiments (docs/experiments.md, 20 seeds a cell) found it a cure for synchronous training at a high "
        "learning rate only: 8 experts, lr 1e-2: 12 of 20 runs polarized without it, 1 of 20 with it (Fisher p "
        "0.0004); 4 experts: 10 against 4 of 20 (p 0.10). It did not cure the polarization that stale gradients "
        "(asynchronous training) cause: 10 against 11 of 20 at 32 steps stale and lr 1e-3, 12 against 12 of 20 "
        "at 8 steps and lr 1e-2. The online guard (gw.Guard), which applies it only once the finding fires, did "
        "less: 12 to 7 and 10 to 7 of 20 synchronous, no change when stale. So: training synchronously at a high "
        "learning rate, use gate dropout from the start; with stale gradients, reduce the staleness (0 of 20 runs "
        "polarized at 8 steps, 10 of 20 at 32, with 8 experts and lr 1e-3) or the learning rate first. A "
        "temperature above 1, LayerNorm inside the gate or a smaller gate init soften the gate but were not "
        "tested here."
    ),
    "sharp_routing": (
        "Usually healthy: the gate specialises. If one expert's failure would hurt, gate dropout "
        "(gw.remedies.GateDropout(0.1)) makes routing more robust; check the Ablations page."
    ),
    "collapse": (
        "A few experts carry every task. Use gate dropout (gw.remedies.GateDropout(0.1)), a smaller gate init "
        "or a softmax temperature above 1 to spread the weight, or give tasks their own experts (CGC/PLE). "
        "Evidence so far (docs/experiments.md, census, 20 seeds a cell): collapses came with stale gradients; "
        "gate dropout lowered them a little: 8 steps stale at lr 1e-2, 13 of 20 runs without it, 9 with it, 10 "
        "with the online guard; 32 steps stale at lr 1e-3, 3 / 0 / 1 of 20. A softmax temperature of 0.1 at lr "
        "1e-2 caused a collapse."
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
}


def gate_findings(run: Run, th: Thresholds) -> list[Finding]:
    out: list[Finding] = []
    gates = run.gates.dropna(subset=["samples"])
    gates = gates[gates["samples"] > 0]
    shares = run.shares
    for name, g in gates.groupby("gate", sort=False):
        g = g.sort_values("step")
        last = g.iloc[-1]
        task = None if pd.isna(last["task"]) else str(last["task"])
        label = who(run, str(name), task)
        polarized = g["top_share"] >= th.collapse_share
        if bool(polarized.iloc[-1]) and int(last["experts"]) > 1:
            top, at = per_expert_at(shares, str(name), int(last["step"]))
            top = top.sort_values("share", kind="stable")
            expert = str(top["expert_name"].iloc[-1]) if len(top) else "?"
            if at is not None and at != int(last["step"]):
                expert += f" (its largest share at step {at:,}, the last window with per-expert rows)"
            meaning = ("the task uses one expert, so MMoE has degenerated into a single tower for it" if task else
                       "one expert does the work of all, and the others hardly get any gradient")
            out.append(_finding(
                "polarization", "error", name, task, streak_start(g["step"], polarized),
                f"{label} is polarized: its mean gate puts {last['top_share']:.0%} of the weight on expert {expert} "
                f"(effective experts {last['effective_experts']:.2f} of {int(last['experts'])}); {meaning}.", "gates",
            ))
        elif last["polarization"] >= th.sharp_samples and int(last["experts"]) > 1:
            sharp = g["polarization"] >= th.sharp_samples
            out.append(_finding(
                "sharp_routing", "info", name, task, streak_start(g["step"], sharp),
                f"{label} routes sharply: {last['polarization']:.0%} of samples put most of their weight on one "
                f"expert, but different samples use different experts (largest mean share {last['top_share']:.0%}, "
                f"input-expert information {last['mutual_info']:.2f}). This is specialisation, not collapse.",
                "gates",
            ))
        independent = (g["spread"] < th.independent_spread) & (g["mutual_info"] < th.independent_mi) & ~polarized
        if bool(independent.iloc[-1]) and int(last["experts"]) > 1:
            out.append(_finding(
                "input_independent", "warning", name, task, streak_start(g["step"], independent),
                f"{label} ignores its input: every sample gets almost the same weights (spread across samples "
                f"{last['spread']:.3f}, mutual information {last['mutual_info']:.3f}).", "gates",
            ))
        out += _unstable(g, name, task, label, th)
        bad = g[g["nonfinite"] > 0]
        if len(bad):
            first = bad["first_nonfinite_step"].dropna()
            step = int(first.min()) if len(first) else int(bad["step"].iloc[0])
            out.append(_finding(
                "nonfinite", "error", name, task, step,
                f"{label} produced NaN/Inf weights ({int(bad['nonfinite'].sum())} samples), first at step {step}; "
                "they were left out of the statistics.", "gates",
            ))
    return out


def _unstable(g: pd.DataFrame, name: str, task: str | None, label: str, th: Thresholds) -> list[Finding]:
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
        f"{label} keeps swinging: its mean gate moved by more than {th.unstable_drift} bits (Jensen-Shannon) between "
        f"windows in {jumpy.mean():.0%} of the second half of training.", "gates",
    )]


def expert_findings(run: Run, th: Thresholds) -> list[Finding]:
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


def per_expert_at(table: pd.DataFrame, gate: str, step: int) -> tuple[pd.DataFrame, int | None]:
    """``gate``'s rows of a per-expert table (``shares``, ``router_experts``) in the latest window at or before
    ``step`` that has them (a wide model keeps them every K-th window only), sorted by expert, and that window's
    step (None when it has none)."""
    mine = table[(table["gate"] == gate) & (table["step"] <= step)]
    if not len(mine):
        return mine, None
    at = int(mine["step"].max())
    return mine[mine["step"] == at].sort_values("expert"), at


def last_windows(run: Run) -> list[tuple[str, pd.Series, pd.DataFrame]]:
    """Each gate's last window with samples: (name, its ``gates`` row, its ``shares`` rows by expert from the
    latest window that has them), in run.json's gate order."""
    gates = run.gates.dropna(subset=["samples"])
    gates = gates[gates["samples"] > 0]
    if not len(gates):
        return []
    last = gates.sort_values("step").groupby("gate", sort=False).tail(1).set_index("gate")
    shares = run.shares
    out = []
    for name in [n for n in run.gate_names if n in last.index] + [n for n in last.index if n not in run.gate_names]:
        row = last.loc[name]
        out.append((name, row, per_expert_at(shares, name, int(row["step"]))[0]))
    return out


def expert_step(step: int, rows: pd.DataFrame) -> dict[str, int]:
    """``{"expert_step": s}`` when the per-expert ``rows`` come from an earlier window (step ``s``) than the
    window at ``step`` (a wide model's last window without them: a run still running); else ``{}``."""
    at = int(rows["step"].iloc[0]) if len(rows) else step
    return {"expert_step": at} if at != step else {}


def gate_summaries(run: Run, thresholds: Thresholds) -> list[dict[str, Any]]:
    """The last window of each gate, in run.json's gate order (``expert_names``/``expert_share`` from the latest
    window with per-expert rows: ``expert_step`` says which when it is an earlier one)."""
    out = []
    for name, row, sh in last_windows(run):
        out.append({
            "name": name, "task": None if pd.isna(row["task"]) else str(row["task"]), "level": int(row["level"]),
            "experts": int(row["experts"]), "expert_names": sh["expert_name"].astype(str).tolist(),
            "expert_share": [num(v) for v in sh["share"]], "entropy": num(row["entropy"]),
            "polarization": num(row["polarization"]), "max_weight": num(row["max_weight"]),
            "top_share": num(row["top_share"]), "effective_experts": num(row["effective_experts"]),
            "mutual_info": num(row["mutual_info"]), "step": int(row["step"]), **expert_step(int(row["step"]), sh),
        })
    return out


def gate_balance(run: Run, thresholds: Thresholds) -> list[dict[str, Any]]:
    """Load balance of each gate's own experts in its last window: per layer for sparse routers.

    ``load`` is, per expert, the share of tokens that pick it among their top k for a router (``top_k`` set;
    the shares add up to k), the mean gate weight otherwise; ``load_cv`` is its coefficient of variation;
    ``dead`` names the experts whose mean weight is below ``dead_fraction`` of an even split; ``small_margin``
    is the share of tokens whose k-th and (k+1)-th weights are closer than the watch's margin (routers only).
    The per-expert figures come from the latest window that has per-expert rows (``expert_step`` when earlier).
    """
    top_k = {g["name"]: g.get("top_k") for g in run.meta.get("gates") or [] if isinstance(g, dict) and "name" in g}
    out = []
    for name, row, sh in last_windows(run):
        routed = bool(top_k.get(name)) and bool(sh["selected"].notna().all())
        load = sh["selected"] if routed else sh["share"]
        dead = sh["share"] < thresholds.dead_fraction / max(len(sh), 1)
        out.append({
            "gate": name, "top_k": top_k.get(name), "expert_names": sh["expert_name"].astype(str).tolist(),
            "load": [num(v) for v in load], "load_cv": load_cv(load),
            "dead": sh.loc[dead, "expert_name"].astype(str).tolist(), "small_margin": num(row["small_margin"]),
            "step": int(row["step"]), **expert_step(int(row["step"]), sh),
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
    return {
        "names": last["expert"].astype(str).tolist(), "utilization": [num(v) for v in util],
        "dead": [int(i) for i in dead], "load_cv": load_cv(util),
    }


def _finding(code: str, severity: str, gate: str | None, task: str | None, step: int, message: str,
             chart: str, expert: str | None = None) -> Finding:
    return Finding(code, severity, gate, task, int(step), message, REMEDY_TEXTS[code], chart, expert)


GATE_SCALARS = ("entropy", "entropy_of_mean", "mutual_info", "effective_experts", "polarization",
                "max_weight", "top_share", "spread", "drift")


def gate_scalars(tables: Mapping[str, pd.DataFrame], add: Add) -> None:
    """``gate/<gate>/<metric>``, ``gate/<gate>/share/<expert>`` (while gates x experts <= 256),
    ``expert/<expert>/utilization`` and ``experts/load_cv``."""
    for row in table_rows(tables, "gates"):
        for metric in GATE_SCALARS:
            add(f"gate/{row.gate}/{metric}", getattr(row, metric), row.step)
    for row in table_rows(tables, "shares") if per_expert_ok(tables) else ():
        add(f"gate/{row.gate}/share/{row.expert_name}", row.share, row.step)
    for row in table_rows(tables, "experts"):
        add(f"expert/{row.expert}/utilization", row.utilization, row.step)
    experts = tables.get("experts")
    if experts is not None and len(experts):
        for step, util in experts.groupby("step")["utilization"]:
            cv = load_cv(util)
            add("experts/load_cv", math.nan if cv is None else cv, step)


FULL_SHARES = 16  # a gate with more experts shows its TOP_SHOWN largest and smallest shares, not all of them
TOP_SHOWN = 3
PATTERN_FROM = 4  # more layers than this are named as a pattern (model.layers.{0..47}.mlp.gate) and by number


def shares_text(names: list[str], values: list[float | None], full: int = FULL_SHARES) -> str:
    """Every share (``[0.10 0.20 ...]``) up to ``full`` experts; above, the largest and smallest TOP_SHOWN with
    their experts (``top 5:0.12 9:0.08 1:0.07, bottom ...``). The JSON keeps every share."""
    if len(values) <= full:
        return f"[{fmt_list(values)}]"
    order = sorted(range(len(values)), key=lambda i: -math.inf if values[i] is None else values[i])

    def pick(idx: list[int]) -> str:
        return " ".join(f"{names[i]}:{values[i]:.3f}" for i in idx)

    return f"top {pick(order[::-1][:TOP_SHOWN])}, bottom {pick(order[:TOP_SHOWN])}"


def bare(names: list[str], gate: str) -> list[str]:
    """Expert names without their gate's name in front (fused experts are named ``<gate>:<index>``)."""
    head = f"{gate}:"
    return [n.removeprefix(head) for n in names]


def _top(names: list[str], values: list[float | None]) -> str:
    known = [(v, n) for n, v in zip(names, values, strict=True) if v is not None]
    if not known:
        return "-"
    value, name = max(known)
    return f"{name} ({value:.3f})"


def gates_text(gates: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """One line per gate. Router layers: MaxVio, dead experts, entropy, the top expert (dispatch load),
    specialisation over sample groups (when the run has them), and the largest and smallest loads."""
    layers = report.get("unit") == "layer"
    balance = {b["gate"]: b for b in report.get("balance") or []}
    special = {s["gate"]: s.get("value") for s in report.get("group_specialisation") or [] if isinstance(s, dict)}
    names = [g["name"] for g in gates]
    routed = [n for n in names if (balance.get(n) or {}).get("max_violation") is not None]
    if layers and len(names) > PATTERN_FROM:
        kind = "router layers" if len(routed) == len(names) else "layers"
        lines = ["", f"{len(names)} {kind}: {name_pattern(names)} (last window)"]
        label = short_names(names)
    else:
        lines = ["", f"{'layers' if layers else 'gates'} (last window):"]
        label = {n: n for n in names}
    width = max((len(v) for v in label.values()), default=0)
    for g in gates:
        b = balance.get(g["name"]) or {}
        spec = f"  specialisation {fmt(special[g['name']])}" if g["name"] in special else ""
        at = b.get("expert_step", g.get("expert_step"))
        spec += f"  (per-expert at step {at:,})" if at is not None else ""
        if g["name"] in routed:
            load, experts = b["load"], bare(b["expert_names"], g["name"])
            lines.append(f"  {label[g['name']]:<{width}}  MaxVio {fmt(b['max_violation'])}  dead {len(b['dead']):>3}/"
                         f"{len(load)}  entropy {fmt(g['entropy'])}  top {_top(experts, load)}{spec}  "
                         f"load {shares_text(experts, load)}")
            continue
        task = "" if layers else f"task={g['task'] or '-':<10} "
        lines.append(f"  {label[g['name']]:<16} {task}entropy={fmt(g['entropy'])} "
                     f"polarized={fmt(g['polarization'])} top_share={fmt(g['top_share'])}{spec}  "
                     f"share={shares_text(bare(g['expert_names'], g['name']), g['expert_share'])}")
    return lines


def balance_text(balance: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """The top-k gates that are not sparse routers (a router's balance is on its layer's line)."""
    return [f"  {b['gate']:<16} top-{b['top_k']} tokens={shares_text(b['expert_names'], b['load'])} load CV "
            f"{fmt(b['load_cv'])}, small margin {fmt(b['small_margin'])}, dead: {', '.join(b['dead']) or 'none'}"
            for b in balance if b["top_k"] and b.get("max_violation") is None]


def experts_text(ex: dict[str, Any], report: dict[str, Any]) -> list[str]:
    if not ex["names"]:
        return []
    if len(ex["names"]) > FULL_SHARES:
        util = f"{len(ex['names'])} labels, utilization {shares_text(ex['names'], ex['utilization'])}"
    else:
        util = " ".join(f"{n}:{fmt(u)}" for n, u in zip(ex["names"], ex["utilization"], strict=True))
    dead = ex["dead"] if len(ex["dead"]) <= FULL_SHARES else f"{len(ex['dead'])} of {len(ex['names'])}"
    return ["", f"experts: {util}", f"  load CV {fmt(ex['load_cv'])}, dead: {dead or 'none'}"]


QUANTITY = ReadHalf(
    tables=TABLES, windowed=("gates", "shares", "hist", "experts"), scalars=gate_scalars,
    sections=(Section("gates", gate_summaries, gates_text), Section("balance", gate_balance, balance_text),
              Section("experts", expert_summary, experts_text)),
    rules=(gate_findings, expert_findings), remedy_texts=REMEDY_TEXTS,
    pages=(Page("gates", "Gates", ":material/call_split:", "gatewatch.app.views.gates", 20,
                "?run=polarized&gate=like", 4),
           Page("experts", "Experts", ":material/groups:", "gatewatch.app.views.experts", 30, "?run=healthy", 4)),
    figures=("gatewatch.figures.gates", "gatewatch.figures.experts"),
)
