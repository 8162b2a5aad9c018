"""Do a sparse MoE's experts specialise by domain while it trains, does its routing saturate, which experts are
chosen together, and does gatewatch see it?

A tiny transformers Qwen3-MoE (gatewatch.models.SparseMoE: 2 layers, 8 experts, top-2) learns two tasks on token
sequences from three synthetic domains (gatewatch.data.make_domains: the domains differ in their token statistics
and in what must be predicted; no token marks the domain). GateWatch labels each sequence with its domain
(``sample_groups``) and logs, per layer and window, the specialisation I(G;E)/H(G) and its shuffled-label baseline;
every ``--probe-every`` steps the routers' top-k sets on a fixed probe batch (the first training batch: routing
stability between probes, and at the end the saturation against the final model); and per window the experts'
co-activation (the whole matrix in every window). A control trains the same model with labels unrelated to the
data (each sequence a random domain): the labels then carry no information, which is what the ``groups_overlap``
finding should report. The labels do not enter training, so the control's routing, stability and co-activation
are those of the real run with the same seed; the summary checks that they are.

    python scripts/experiments/group_specialisation.py            # 10 seeds, real and control labels
    python scripts/experiments/group_specialisation.py --seeds 2 --steps 60 --tag small

Writes, under docs/experiments/, group_specialisation[_TAG]:
  .json (settings and summary), .csv (one row per run), .jsonl (each run as it finishes; removed at the end),
  _specialisation.csv (per run, layer and window), _stability.csv (per run, layer and probe: stability and
  saturation), _coactivation.csv (per run, layer and window: the pair structure), .html/.png (figure).
"""

from __future__ import annotations

import json
import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from common import parser, run_all, save_figure, settings, write_results
from plotly.subplots import make_subplots
from torch import nn

import gatewatch as gw
from gatewatch.data import make_domains
from gatewatch.data.domains import domain_names
from gatewatch.models import SparseMoE

DOMAINS, SEQ, BATCH, EVERY, EXPERTS, TOP_K = 3, 16, 64, 10, 8, 2
INDEPENDENT = (TOP_K - 1) / (EXPERTS - 1)  # P(b | a) of an even random top-k choice
STRONG = 2 * INDEPENDENT  # a "strongly co-activated" pair: P(b | a) above twice that
THRESHOLDS = (0.5, 0.8, 0.9)


def one_run(job: dict[str, Any]) -> dict[str, Any]:
    """Train one seed with labels "domain" (the true domain of each sequence) or "control" (a random one)."""
    seed, labels = job["labels"]["seed"], job["labels"]["labels"]
    steps, probe_every = job["steps"], job["probe_every"]
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    data = make_domains(steps * BATCH // 4, seq_len=SEQ, n_domains=DOMAINS, seed=seed)
    group = data.domain if labels == "domain" else torch.randint(0, DOMAINS, data.domain.shape,
                                                                  generator=torch.Generator().manual_seed(seed + 7))
    model = SparseMoE(in_dim=SEQ, tasks=["flag", "score"], n_layers=2, n_experts=EXPERTS, top_k=TOP_K)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with tempfile.TemporaryDirectory() as folder:
        watch = gw.GateWatch(model, tasks=["flag", "score"], log_dir=folder, every=EVERY, flush_every=100,
                             tensorboard=False, sample_groups=domain_names(DOMAINS), saturation_every=probe_every,
                             coactivation_full_every=1)
        order = torch.Generator().manual_seed(seed + 1)
        started = time.perf_counter()
        for step in range(steps):
            if step % (len(data.tokens) // BATCH) == 0:
                perm = torch.randperm(len(data.tokens), generator=order)
            rows = perm[(step % (len(data.tokens) // BATCH)) * BATCH:][:BATCH]
            with watch.grouped(group[rows]):
                flag, score = model(data.tokens[rows])
            y = data.targets[rows]
            watch.backward({"flag": nn.functional.binary_cross_entropy_with_logits(flag, y[:, 0]),
                            "score": nn.functional.mse_loss(score, y[:, 1])})
            opt.step()
            opt.zero_grad()
            watch.step()
        watch.close()
        seconds = time.perf_counter() - started
        run = gw.load_run(folder)
        spec = run.table("group_specialisation")
        routing = run.table("group_routing")
        stability = run.table("routing_stability").merge(
            run.table("saturation")[["step", "gate", "saturation", "top1_agree"]].rename(
                columns={"top1_agree": "saturation_top1"}), on=["step", "gate"], how="outer")
        pairs = run.table("coactivation")
        found = gw.find(run)
    last = routing[routing["step"] == routing["step"].max()]
    return {"seed": seed, "labels": labels, "seconds": seconds,
            "windows": spec[["step", "gate", "value", "baseline"]].to_dict("records"),
            "stability": stability[["step", "gate", "tokens", "stable", "top1_agree", "saturation",
                                    "saturation_top1"]].to_dict("records"),
            "coactivation": [pair_structure(int(step), str(gate), g)
                             for (step, gate), g in pairs.groupby(["step", "gate"])],
            "top_share_max": float(routing["top_share"].max()),
            "last_top_experts": {f"{r.gate}/{r.group}": int(r.top_expert) for r in last.itertuples()},
            "findings": sorted({f.code for f in found if f.code in ("group_polarization", "groups_overlap")})}


def pair_structure(step: int, gate: str, rows: pd.DataFrame) -> dict[str, Any]:
    """One window's co-activation matrix (rows of the ``coactivation`` table) summarised: the directed pairs with
    P(b | a) above twice the even level, the strongest pair and the top pairs' share of all co-activations."""
    counts = np.zeros((EXPERTS, EXPERTS))
    counts[rows["expert_a"], rows["expert_b"]] = rows["count"]
    chose = np.diag(counts).copy()
    off = np.triu(counts, 1)
    both = off + off.T
    with np.errstate(divide="ignore", invalid="ignore"):
        given = both / chose[:, None]  # given[a, b] = P(b | a)
    np.fill_diagonal(given, np.nan)
    flat = np.sort(off[np.triu_indices(EXPERTS, 1)])[::-1]
    total = flat.sum()
    a, b = np.unravel_index(np.argmax(off), off.shape)
    return {"step": step, "gate": gate, "tokens": int(chose.sum() // TOP_K),
            "strong_pairs": int(np.nansum(given > STRONG)), "max_p": float(np.nanmax(given)),
            "top1_share": float(flat[0] / total), "top3_share": float(flat[:3].sum() / total),
            "top_pair": f"{a}-{b}", "load_max": float(chose.max() / chose.sum())}


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 29: 2.045}  # Student t, 97.5%


def interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% t-interval over seeds."""
    values = np.asarray(values, dtype=float)
    m = float(values.mean())
    if len(values) < 2:
        return m, m, m
    t = T975.get(len(values) - 1, 1.96 if len(values) > 30 else 2.1)
    half = float(t * values.std(ddof=1) / np.sqrt(len(values)))
    return m, m - half, m + half


def frames(results: list[dict[str, Any]]) -> dict[str, pd.DataFrame]:
    """The runs' windows, probes and co-activation summaries as tables with a ``layer`` column."""
    out = {}
    for key in ("windows", "stability", "coactivation"):
        df = pd.DataFrame([{"seed": r["seed"], "labels": r["labels"], **w} for r in results for w in r[key]])
        df["layer"] = df["gate"].str.extract(r"layers\.(\d+)")[0].astype(int)
        out[key] = df.sort_values(["labels", "seed", "layer", "step"], ignore_index=True)
    out["windows"]["gap"] = out["windows"]["value"] - out["windows"]["baseline"]
    return out


def curves(df: pd.DataFrame, columns: tuple[str, ...]) -> dict[str, Any]:
    """Per layer and step, the mean and 95% interval over seeds of each of ``columns``."""
    return {f"layer{layer}": {int(step): {c: interval(s[c].dropna().to_numpy()) for c in columns
                                          if s[c].notna().any()}
                              for step, s in g.groupby("step")}
            for layer, g in df.groupby("layer")}


def first_passing(stability: pd.DataFrame) -> dict[str, Any]:
    """Per layer and threshold: the first probe step at which each seed's saturation reaches it (mean and
    interval over seeds), and the first step at which the mean over seeds does."""
    out: dict[str, Any] = {}
    for layer, g in stability.groupby("layer"):
        mean = g.groupby("step")["saturation"].mean()
        out[f"layer{layer}"] = {}
        for th in THRESHOLDS:
            per_seed = g[g["saturation"] >= th].groupby("seed")["step"].min().to_numpy()
            out[f"layer{layer}"][str(th)] = {"seeds": interval(per_seed),
                                             "mean_curve": int(mean[mean >= th].index.min())}
    return out


def pair_identity(coactivation: pd.DataFrame) -> dict[str, Any]:
    """Is the strongest pair the same across seeds (expected by chance: 1 / C(E, 2)), and within a seed, how
    often the second half of training's windows have the final window's strongest pair?"""
    out: dict[str, Any] = {"chance": 1 / (EXPERTS * (EXPERTS - 1) / 2)}
    last_step = coactivation["step"].max()
    for layer, g in coactivation.groupby("layer"):
        final = g[g["step"] == last_step].set_index("seed")["top_pair"]
        same = [final[a] == final[b] for i, a in enumerate(final.index) for b in final.index[i + 1:]]
        late = g[g["step"] > last_step / 2]
        held = np.array([(s["top_pair"] == final[seed]).mean() for seed, s in late.groupby("seed")])
        out[f"layer{layer}"] = {"final_top_pairs": final.to_dict(), "seed_pairs_same": float(np.mean(same)),
                                "late_windows_with_final_pair": interval(held)}
    return out


def summarise(results: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    tables = frames(results)
    rows, stability, pairs = tables["windows"], tables["stability"], tables["coactivation"]
    out: dict[str, Any] = {"per_layer": {}, "findings": {}, "seconds": {}}
    for labels, g in rows.groupby("labels"):
        for layer, curve in curves(g, ("value", "baseline")).items():
            out["per_layer"][f"{labels}/{layer}"] = curve
    for labels in ("domain", "control"):
        mine = [r for r in results if r["labels"] == labels]
        out["findings"][labels] = {code: sum(code in r["findings"] for r in mine)
                                   for code in ("group_polarization", "groups_overlap")}
        out["findings"][labels]["runs"] = len(mine)
        out["seconds"][labels] = float(np.mean([r["seconds"] for r in mine])) if mine else None
        gaps = rows[rows["labels"] == labels].groupby(["seed", "layer"]).tail(10)["gap"]
        out["findings"][labels]["gap_last10_windows"] = [float(gaps.min()), float(gaps.median()), float(gaps.max())] \
            if len(gaps) else None
        out["findings"][labels]["top_share_max"] = max((r["top_share_max"] for r in mine), default=None)
    real_probes, real_pairs = stability[stability["labels"] == "domain"], pairs[pairs["labels"] == "domain"]
    out["stability"] = curves(real_probes, ("stable", "top1_agree", "saturation", "saturation_top1"))
    out["saturation_passes"] = first_passing(real_probes)
    out["coactivation"] = curves(real_pairs, ("strong_pairs", "max_p", "top1_share", "top3_share", "load_max"))
    out["coactivation_pairs"] = pair_identity(real_pairs)
    out["coactivation_levels"] = {"independent_p": INDEPENDENT, "strong_p": STRONG,
                                  "directed_pairs": EXPERTS * (EXPERTS - 1), "even_top1_share": out[
                                      "coactivation_pairs"]["chance"]}
    out["control_same_routing"] = same_routing(stability, pairs)
    return out, tables


def same_routing(stability: pd.DataFrame, pairs: pd.DataFrame) -> dict[str, Any]:
    """The largest difference between the real and control runs of one seed in saturation and co-activation:
    the labels do not enter training, so both should be 0."""
    keys = ["seed", "layer", "step"]
    sat = stability.pivot_table(index=keys, columns="labels", values="saturation").dropna()
    co = pairs.pivot_table(index=keys, columns="labels", values="max_p").dropna()
    if "control" not in sat or "domain" not in sat:
        return {}
    return {"saturation": float((sat["domain"] - sat["control"]).abs().max()),
            "max_p": float((co["domain"] - co["control"]).abs().max()), "compared": len(sat)}


def figure(summary: dict[str, Any]) -> go.Figure:
    """Specialisation (and its baseline), saturation and stability, and strongly co-activated pairs, per layer
    over training: mean and 95% interval over seeds."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=("specialisation I(G;E)/H(G)", "routing saturation / stability",
                                                        f"pairs with P(b|a) > {STRONG:.2f}"))
    colours = ("#1f77b4", "#d62728")

    def band(col: int, curve: dict[Any, Any], key: str, name: str, colour: str, dash: str = "solid") -> None:
        steps = sorted(int(s) for s in curve if key in curve[s])
        m, lo, hi = (np.array([curve[s][key][i] for s in steps]) for i in range(3))
        fig.add_trace(go.Scatter(x=steps + steps[::-1], y=list(hi) + list(lo[::-1]), fill="toself", opacity=0.2,
                                 line={"width": 0}, fillcolor=colour, showlegend=False, hoverinfo="skip"), 1, col)
        fig.add_trace(go.Scatter(x=steps, y=m, name=name, line={"color": colour, "dash": dash},
                                 showlegend=col != 2 or key != "stable"), 1, col)

    for layer, colour in enumerate(colours):
        spec = summary["per_layer"][f"domain/layer{layer}"]
        band(1, spec, "value", f"layer {layer}", colour)
        band(1, spec, "baseline", f"layer {layer} baseline", colour, "dot")
        band(2, summary["stability"][f"layer{layer}"], "saturation", f"layer {layer} saturation", colour)
        band(2, summary["stability"][f"layer{layer}"], "stable", f"layer {layer} stable since last probe", colour,
             "dot")
        band(3, summary["coactivation"][f"layer{layer}"], "strong_pairs", f"layer {layer} strong pairs", colour)
    for col in (1, 2, 3):
        fig.update_xaxes(title_text="step", row=1, col=col)
    fig.update_layout(title="Sparse MoE on 3 synthetic domains: mean and 95% interval over seeds", height=450,
                      width=1300)
    return fig


def main() -> None:
    p = parser(__doc__.splitlines()[0], seeds=10, steps=500)
    p.add_argument("--probe-every", type=int, default=5, help="steps between routing probes (default 5)")
    args = p.parse_args()
    stem = f"group_specialisation{'_' + args.tag if args.tag else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    progress = args.out / f"{stem}.jsonl"
    progress.write_text("")

    def keep(row: dict[str, Any]) -> None:
        with progress.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    jobs = [{"labels": {"seed": seed, "labels": labels}, "steps": args.steps, "probe_every": args.probe_every}
            for seed in range(args.seeds) for labels in ("domain", "control")]
    started = time.perf_counter()
    results = run_all(jobs, args.workers, keep, worker=one_run)
    summary, tables = summarise(results)
    meta = settings(args, total_seconds=time.perf_counter() - started, summary=summary)
    runs = [{k: v for k, v in r.items() if k not in ("windows", "stability", "coactivation")} for r in results]
    write_results(runs, args.out, stem, meta)
    for name, key in (("specialisation", "windows"), ("stability", "stability"), ("coactivation", "coactivation")):
        tables[key].to_csv(args.out / f"{stem}_{name}.csv", index=False)
    save_figure(figure(summary), args.out, stem, width=1300, height=450)
    progress.unlink()  # the CSVs above hold every run
    print(f"{len(results)} runs in {meta['total_seconds']:.0f} s -> {args.out / stem}.json")


if __name__ == "__main__":
    main()
