"""Co-activation, read half: which experts of a router are chosen together by the same token.

Per router (layer) and window, over every pair of each token's top-k: ``count`` (tokens that chose both),
``share`` (count / tokens) and the conditional ``P(b | a)`` = count(a, b) / count(a): of the tokens that chose
``a``, the share that also chose ``b``. Two tables keep the storage bounded at 48 layers x 128 experts:

* ``coactivation``: the whole upper triangle (the diagonal ``a == b`` holds the tokens that chose ``a``), in the
  first window, every ``coactivation_full_every``-th window (100 by default) and the run's last window;
* ``coactivation_top``: every window, the ``coactivation_top`` pairs (8 by default) with the largest count.

An even router that picks k of E experts at random gives ``P(b | a) = (k - 1) / (E - 1)`` for every pair: the
report sets each layer's strongest pair beside that baseline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ...declarations import Panel, ReadHalf, Section
from ...rules import Thresholds, num
from ...skipped import entry

if TYPE_CHECKING:
    from ...loaded_run import Run

TOP_PAIRS = 8

TABLES: dict[str, dict[str, str]] = {
    # the whole matrix of a window (the first, every coactivation_full_every-th, the last): a <= b; a == b: the
    # tokens that chose a
    "coactivation": {"step": "int64", "gate": "string", "expert_a": "int64", "expert_b": "int64", "count": "int64"},
    # every window: the coactivation_top pairs a < b with the largest count; share = count / tokens;
    # p_b_given_a = count / (tokens that chose a)
    "coactivation_top": {"step": "int64", "gate": "string", "rank": "int64", "expert_a": "int64",
                         "expert_b": "int64", "count": "int64", "share": "float64", "p_b_given_a": "float64",
                         "p_a_given_b": "float64"},
}


def experts_of(width: int) -> int:
    """E from the width of one window's state: the upper triangle E (E + 1) / 2, plus the token count."""
    n = width - 1
    e = int((np.sqrt(8 * n + 1) - 1) / 2 + 0.5)
    if e * (e + 1) // 2 != n:
        raise ValueError(f"a co-activation state of width {width} is not an upper triangle plus a count")
    return e


def pair_rows(gate: str, step: int, state: np.ndarray, top: int, *, full: bool
              ) -> tuple[pd.DataFrame | None, pd.DataFrame]:
    """One router's window (``state``: upper triangle row by row, then the token count) as rows of
    ``coactivation`` (when ``full``) and ``coactivation_top``."""
    e = experts_of(len(state))
    a, b = np.triu_indices(e)
    counts = np.rint(state[:-1]).astype(np.int64)
    tokens = float(state[-1])
    chose = counts[a == b]  # the diagonal, in expert order
    off = a != b
    pa, pb, pc = a[off], b[off], counts[off]
    order = np.argsort(-pc, kind="stable")[:top]
    order = order[pc[order] > 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        top_rows = pd.DataFrame({
            "step": step, "gate": gate, "rank": np.arange(1, len(order) + 1), "expert_a": pa[order],
            "expert_b": pb[order], "count": pc[order], "share": pc[order] / tokens if tokens else np.nan,
            "p_b_given_a": pc[order] / chose[pa[order]], "p_a_given_b": pc[order] / chose[pb[order]]})
    whole = None
    if full:
        keep = counts > 0
        whole = pd.DataFrame({"step": step, "gate": gate, "expert_a": a[keep], "expert_b": b[keep],
                              "count": counts[keep]})
    return whole, top_rows


def last_coactivation(run: Run, th: Thresholds) -> list[dict[str, Any]]:
    """Per router, in its last window: the three pairs chosen together most often, and the baseline
    ``P(b | a)`` of an even random choice, (k - 1) / (E - 1)."""
    top = run.table("coactivation_top")
    if not len(top):
        return []
    routers = run.table("routers")
    shape = routers.drop_duplicates("gate", keep="last").set_index("gate")[["experts", "top_k"]] \
        if len(routers) else pd.DataFrame(columns=["experts", "top_k"])
    out = []
    for gate, rows in top.groupby("gate", sort=False):
        last = rows[rows["step"] == rows["step"].max()].sort_values("rank").head(3)
        e, k = (shape.loc[gate, "experts"], shape.loc[gate, "top_k"]) if gate in shape.index else (None, None)
        out.append({
            "gate": str(gate), "step": int(last["step"].iloc[0]),
            "baseline": num((k - 1) / (e - 1)) if e and k and e > 1 else None,
            "pairs": [{"experts": [int(r.expert_a), int(r.expert_b)], "count": int(r.count), "share": num(r.share),
                       "p_b_given_a": num(r.p_b_given_a), "p_a_given_b": num(r.p_a_given_b)}
                      for r in last.itertuples(index=False)],
        })
    return out


def coactivation_text(section: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """One line: the layer whose strongest pair is most above the even baseline."""
    scored = [(max(max(p["p_b_given_a"] or 0, p["p_a_given_b"] or 0) for p in s["pairs"]), s)
              for s in section if s["pairs"]]
    if not scored:
        return []
    value, s = max(scored, key=lambda x: x[0])
    a, b = s["pairs"][0]["experts"]
    base = f" (even random choice: {s['baseline']:.3f})" if s["baseline"] is not None else ""
    return ["", f"co-activation ({len(section)} layers, last window): strongest in {s['gate']}, experts {a} and {b}: "
                f"P(b|a) up to {value:.3f}{base}"]


def coactivation_skipped(run: Run) -> list[dict[str, Any]]:
    """Routers left out of co-activation: one expert per token, or a capacity router's dispatch mask."""
    described = run.meta.get("coactivation")
    if not isinstance(described, dict):
        return []
    counted = set(described.get("gates") or [])
    out = []
    for r in run.meta.get("routers") or []:
        if isinstance(r, dict) and r.get("gate") not in counted:
            why = ("it chooses one expert per token, so no two experts are chosen together" if r.get("top_k") == 1
                   else "its choice is a dispatch mask (a capacity router), which co-activation does not read")
            out.append(entry("coactivation", r.get("gate"), why, "nothing to pass: co-activation needs top-k >= 2"))
    return out


QUANTITY = ReadHalf(
    tables=TABLES, windowed=("coactivation_top",), measured=("coactivation",),
    sections=(Section("coactivation", last_coactivation, coactivation_text),), skipped=coactivation_skipped,
    panels=(Panel("routers", "gatewatch.app.panels:coactivation"),), figures=("gatewatch.figures.coactivation",),
)
