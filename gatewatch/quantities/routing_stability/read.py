"""Routing stability and saturation, read half: how the routers' top-k choice of a fixed probe batch changes.

Every ``saturation_every`` steps the probe batch runs through the model in eval mode (capture half). Per router
(layer) and probe step:

* ``routing_stability``: ``stable``, the share of probe tokens whose top-k set is the same as at the previous
  probe, and ``top1_agree``, the share whose top-1 expert is (both NaN at the first probe);
* ``routing_sets``: each probe token's top-k set (``experts``, sorted, space-separated) and top-1 expert, for
  comparisons made later (:func:`gatewatch.quantities.routing_stability.reference.saturation_against`);
* ``saturation`` (written at ``close()``): the share of probe tokens whose top-k set at each probe equals the
  final model's (OLMoE's router saturation; ``reference = "final"``), and their top-1 agreement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ...declarations import Panel, ReadHalf, Section
from ...rules import Thresholds, num

if TYPE_CHECKING:
    from ...loaded_run import Run

TABLES: dict[str, dict[str, str]] = {
    "routing_stability": {"step": "int64", "gate": "string", "tokens": "int64", "stable": "float64",
                          "top1_agree": "float64"},
    "routing_sets": {"step": "int64", "gate": "string", "token": "int64", "experts": "string", "top1": "int64"},
    "saturation": {"step": "int64", "gate": "string", "reference": "string", "tokens": "int64",
                   "saturation": "float64", "top1_agree": "float64"},
}


def set_keys(choice: np.ndarray) -> np.ndarray:
    """Each token's top-k set ``[T, k]`` (sorted) as one string: ``"3 17 42"``."""
    return np.array([" ".join(map(str, row)) for row in choice.tolist()], dtype=object)


def agreement(sets: np.ndarray, top1: np.ndarray, ref_sets: np.ndarray, ref_top1: np.ndarray) -> tuple[float, float]:
    """(share of tokens with the same top-k set, share with the same top-1) of two probes of the same tokens."""
    if len(sets) != len(ref_sets) or not len(sets):
        return float("nan"), float("nan")
    return float(np.mean(sets == ref_sets)), float(np.mean(top1 == ref_top1))


@dataclass
class SetHistory:
    """Every probe's sets and top-1 per router: (step, set keys, top-1) in probe order."""

    probes: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = field(default_factory=dict)

    def add(self, gate: str, step: int, sets: np.ndarray, top1: np.ndarray) -> tuple[float, float]:
        """Keep this probe; its agreement with the router's previous probe (NaN at the first)."""
        mine = self.probes.setdefault(gate, [])
        previous = mine[-1] if mine else None
        mine.append((step, sets, top1))
        if previous is None:
            return float("nan"), float("nan")
        return agreement(sets, top1, previous[1], previous[2])

    def saturation(self, reference: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                   name: str = "final") -> pd.DataFrame:
        """Per router and probe, agreement with ``reference`` (gate -> (set keys, top-1); the last probe when
        None)."""
        rows = []
        for gate, probes in self.probes.items():
            ref = (reference or {}).get(gate) if reference is not None else (probes[-1][1], probes[-1][2])
            if ref is None:
                continue
            for step, sets, top1 in probes:
                same, top = agreement(sets, top1, *ref)
                rows.append({"step": step, "gate": gate, "reference": name, "tokens": len(sets),
                             "saturation": same, "top1_agree": top})
        return pd.DataFrame(rows, columns=list(TABLES["saturation"]))


def set_rows(gate: str, step: int, choice: np.ndarray, history: SetHistory) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One router's probe (``choice``: ``[T, k + 1]``, the sorted set then the top-1) as rows of
    ``routing_stability`` and ``routing_sets``; the probe joins ``history``."""
    sets, top1 = set_keys(choice[:, :-1]), choice[:, -1]
    stable, top = history.add(gate, step, sets, top1)
    return (pd.DataFrame([{"step": step, "gate": gate, "tokens": len(sets), "stable": stable, "top1_agree": top}]),
            pd.DataFrame({"step": step, "gate": gate, "token": np.arange(len(sets)), "experts": sets, "top1": top1}))


def history_of(run: Run) -> SetHistory:
    """The probes of a run, from its ``routing_sets`` table."""
    history = SetHistory()
    table = run.table("routing_sets")
    for (gate, step), rows in table.sort_values(["step", "token"]).groupby(["gate", "step"], sort=False):
        history.probes.setdefault(str(gate), []).append(
            (int(step), rows["experts"].to_numpy(dtype=object), rows["top1"].to_numpy(dtype=np.int64)))
    for probes in history.probes.values():
        probes.sort(key=lambda p: p[0])
    return history


def stability_summary(run: Run, th: Thresholds) -> dict[str, Any]:
    """The last probe's stability over the layers (mean, lowest and its layer), and the saturation of each
    probe step averaged over the layers (against the final model; from the stored sets when the run was cut
    off before close())."""
    stable = run.table("routing_stability").dropna(subset=["stable"])
    if not len(stable) and not len(run.table("routing_sets")):
        return {}
    out: dict[str, Any] = {"step": None, "stable": None, "top1_agree": None, "least_stable": None}
    if len(stable):
        last = stable[stable["step"] == stable["step"].max()]
        low = last.loc[last["stable"].idxmin()]
        out.update(step=int(last["step"].iloc[0]), stable=num(last["stable"].mean()),
                   top1_agree=num(last["top1_agree"].mean()), least_stable={"gate": str(low["gate"]),
                                                                           "stable": num(low["stable"])})
    saturation = run.table("saturation")
    if not len(saturation):
        saturation = history_of(run).saturation()
    by_step = saturation.groupby("step")["saturation"].mean()
    out["saturation"] = [{"step": int(s), "value": num(v)} for s, v in by_step.items()]
    return out


def stability_text(section: dict[str, Any], report: dict[str, Any]) -> list[str]:
    if not section:
        return []
    lines = [""]
    if section.get("stable") is not None:
        low = section["least_stable"]
        lines.append(f"routing stability (probe at step {section['step']}): {section['stable']:.3f} of probe tokens "
                     f"keep their top-k set, {section['top1_agree']:.3f} their top-1; least stable "
                     f"{low['gate']} ({low['stable']:.3f})")
    sat = [s for s in section.get("saturation") or [] if s["value"] is not None]
    if sat:
        shown = sat if len(sat) <= 8 else [sat[round(i * (len(sat) - 1) / 7)] for i in range(8)]
        lines.append("saturation (top-k set equals the final model's, mean over layers): "
                     + ", ".join(f"step {s['step']} {s['value']:.2f}" for s in shown))
    return lines


QUANTITY = ReadHalf(
    tables=TABLES, measured=("routing_stability", "routing_sets", "saturation"),
    sections=(Section("routing_stability", stability_summary, stability_text),),
    panels=(Panel("routers", "gatewatch.app.panels:routing_stability"),),
    figures=("gatewatch.figures.routing_stability",),
)
