"""Expert similarity, read half: the ``similarity`` and ``similarity_summary`` tables, the report's ``similarity``
section and the ``redundant_experts`` rule."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...declarations import Panel, ReadHalf, Section
from ...rules import Finding, Thresholds, num
from ...skipped import described_gates, entry, map_fix, unmapped, why_unmapped

if TYPE_CHECKING:
    from ...loaded_run import Run

TABLES: dict[str, dict[str, str]] = {
    # expert similarity (GateWatch(similarity_every=...)): one row per measured step x pool of experts x expert
    # pair (a before b in gate-column order); cka: linear CKA of their outputs on common probe rows (the first
    # similarity_rows rows of the batch; fused experts: of the fused module's input, each row sent to every
    # expert); mean_cosine: cosine of their mean outputs. A pool of more than similarity_top pairs writes every
    # pair on every similarity_full_every-th measurement and its similarity_top most similar pairs in between.
    "similarity": {"step": "int64", "pool": "string", "expert_a": "string", "expert_b": "string",
                   "cka": "float64", "mean_cosine": "float64"},
    # one row per measured step x pool, over all its pairs: pairs compared, rows written to `similarity`, mean and
    # largest CKA, mean cosine of the mean outputs
    "similarity_summary": {"step": "int64", "pool": "string", "pairs": "int64", "written": "int64",
                           "mean_cka": "float64", "max_cka": "float64", "mean_cosine": "float64"},
}

REMEDY_TEXTS = {
    "redundant_experts": (
        "These experts compute nearly the same representation, so the mixture pays for experts it does not use "
        "as such. Use fewer experts; initialise them differently (another seed or scale per expert); add gate "
        "dropout (gw.remedies.GateDropout) so that each expert must stand on its own; or give the tasks their "
        "own experts (CGC/PLE task-specific experts)."
    ),
}


def recent(run: Run, count: int) -> Any:
    """The rows of the last ``count`` measured steps of each pool."""
    table = run.table("similarity")
    if not len(table):
        return table
    keep = table.groupby("pool")["step"].transform(lambda s: s >= sorted(s.unique())[-min(count, s.nunique())])
    return table[keep]


def redundant_experts(run: Run, th: Thresholds) -> list[Finding]:
    """One finding per pool with expert pairs whose CKA is at least ``redundant_cka`` in every one of the last
    ``redundant_steps`` measurements (all of them, when fewer); a pair must have a row in each of them (pools
    that write only their most similar pairs between full measurements)."""
    count = int(th.redundant_steps)
    table = recent(run, count)
    out: list[Finding] = []
    for pool, rows in table.groupby("pool", sort=False):
        steps = rows["step"].nunique()
        if steps < min(count, 2):
            continue
        low = rows.groupby(["expert_a", "expert_b"], sort=False)["cka"].agg(["min", "mean", "count"])
        pairs = low[(low["min"] >= th.redundant_cka) & (low["count"] == steps)].sort_values("mean", ascending=False)
        if not len(pairs):
            continue
        shown = ", ".join(f"{a} ~ {b} ({m:.2f})" for (a, b), m in pairs["mean"].head(5).items())
        more = f" and {len(pairs) - 5} more" if len(pairs) > 5 else ""
        out.append(Finding(
            "redundant_experts", "warning", None, None, int(rows["step"].max()),
            f"experts of {pool!r} compute nearly the same thing: linear CKA >= {th.redundant_cka:g} over the last "
            f"{steps} measurements for {len(pairs)} pair(s): {shown}{more}.", REMEDY_TEXTS["redundant_experts"],
            "experts"))
    return out


def last_similarity(run: Run, th: Thresholds) -> dict[str, Any]:
    """Per pool, at its last measured step: the most similar pair and the mean CKA over all pairs (from
    ``similarity_summary`` when the run has it: the pairs written may be the most similar ones only)."""
    table = run.table("similarity").dropna(subset=["cka"])
    summary = run.table("similarity_summary")
    out: dict[str, Any] = {}
    for pool, rows in table.groupby("pool", sort=False):
        last = rows[rows["step"] == rows["step"].max()]
        top = last.loc[last["cka"].idxmax()]
        whole = summary[(summary["pool"] == pool) & (summary["step"] == top["step"])]
        mean = whole["mean_cka"].iloc[0] if len(whole) else last["cka"].mean()
        out[str(pool)] = {"step": int(top["step"]), "mean_cka": num(mean),
                          "max_cka": num(top["cka"]), "most_similar": [str(top["expert_a"]), str(top["expert_b"])]}
    return out


def similarity_skipped(run: Run) -> list[dict[str, Any]]:
    """Pools whose experts could not be compared, and, while similarity was on, each gate in no pool."""
    similarity = run.meta.get("similarity") if isinstance(run.meta.get("similarity"), dict) else None
    if similarity is None:
        return []
    out = [entry("similarity", None, f"pool {pool!r}: {why}")
           for pool, why in (similarity.get("skipped") or {}).items()]
    pooled = {name for pool in (similarity.get("pools") or {}).values() for name in pool.get("gates", [])}
    for g in described_gates(run.meta):
        if g["name"] in pooled or "expert_modules" not in g:
            continue
        if unmapped(g):
            out.append(entry("similarity", g["name"], why_unmapped(g), map_fix(g)))
        elif g.get("fused_experts") and "top" not in similarity:
            out.append(entry("similarity", g["name"], "its experts are fused (slices of [E, ...] parameters) and this "
                             "run was recorded by a gatewatch that did not measure their similarity",
                             "record the run again with this gatewatch"))
    return out


QUANTITY = ReadHalf(
    tables=TABLES, sections=(Section("similarity", last_similarity),), skipped=similarity_skipped,
    rules=(redundant_experts,), remedy_texts=REMEDY_TEXTS,
    panels=(Panel("experts", "gatewatch.app.panels:similarity"),), figures=("gatewatch.figures.similarity",),
)
