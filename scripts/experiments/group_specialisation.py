"""Do a sparse MoE's experts specialise by domain while it trains, and does gatewatch see it?

A tiny transformers Qwen3-MoE (gatewatch.models.SparseMoE: 2 layers, 8 experts, top-2) learns two tasks on token
sequences from three synthetic domains (gatewatch.data.make_domains: the domains differ in their token statistics
and in what must be predicted; no token marks the domain). GateWatch labels each sequence with its domain
(``sample_groups``) and logs, per layer and window, the specialisation I(G;E)/H(G) and its shuffled-label baseline.
A control trains the same model with labels unrelated to the data (each sequence a random domain): the labels then
carry no information, which is what the ``groups_overlap`` finding should report.

    python scripts/experiments/group_specialisation.py            # 10 seeds, real and control labels
    python scripts/experiments/group_specialisation.py --seeds 2 --steps 60 --tag small

Writes docs/experiments/group_specialisation{tag}.csv (one row per run, layer and window) and .json (summary).
"""

from __future__ import annotations

import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import parser, settings, write_results

import gatewatch as gw
from gatewatch.data import make_domains
from gatewatch.data.domains import domain_names
from gatewatch.models import SparseMoE

DOMAINS, SEQ, BATCH, EVERY = 3, 16, 64, 10


def one_run(job: tuple[int, str, int]) -> dict[str, Any]:
    """Train one seed with ``labels`` "domain" (the true domain of each sequence) or "control" (a random one)."""
    seed, labels, steps = job
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    data = make_domains(steps * BATCH // 4, seq_len=SEQ, n_domains=DOMAINS, seed=seed)
    group = data.domain if labels == "domain" else torch.randint(0, DOMAINS, data.domain.shape,
                                                                  generator=torch.Generator().manual_seed(seed + 7))
    model = SparseMoE(in_dim=SEQ, tasks=["flag", "score"], n_layers=2, n_experts=8, top_k=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with tempfile.TemporaryDirectory() as folder:
        watch = gw.GateWatch(model, tasks=["flag", "score"], log_dir=folder, every=EVERY, flush_every=100,
                             tensorboard=False, sample_groups=domain_names(DOMAINS))
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
        found = gw.find(run)
    last = routing[routing["step"] == routing["step"].max()]
    return {"seed": seed, "labels": labels, "seconds": seconds,
            "windows": spec[["step", "gate", "value", "baseline"]].to_dict("records"),
            "top_share_max": float(routing["top_share"].max()),
            "last_top_experts": {f"{r.gate}/{r.group}": int(r.top_expert) for r in last.itertuples()},
            "findings": sorted({f.code for f in found if f.code in ("group_polarization", "groups_overlap")})}


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 29: 2.045}  # Student t, 97.5%


def interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% t-interval over seeds."""
    m = float(values.mean())
    if len(values) < 2:
        return m, m, m
    t = T975.get(len(values) - 1, 1.96 if len(values) > 30 else 2.1)
    half = float(t * values.std(ddof=1) / np.sqrt(len(values)))
    return m, m - half, m + half


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    rows = pd.DataFrame([{"seed": r["seed"], "labels": r["labels"], **w} for r in results for w in r["windows"]])
    rows["layer"] = rows["gate"].str.extract(r"layers\.(\d+)")[0].astype(int)
    rows["gap"] = rows["value"] - rows["baseline"]
    out: dict[str, Any] = {"per_layer": {}, "findings": {}, "seconds": {}}
    for (labels, layer), g in rows.groupby(["labels", "layer"]):
        curve = {}
        for step, s in g.groupby("step"):
            v, b = s["value"].to_numpy(), s["baseline"].to_numpy()
            curve[int(step)] = {"value": interval(v), "baseline": interval(b)}
        out["per_layer"][f"{labels}/layer{layer}"] = curve
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
    return {"summary": out, "rows": rows}


def main() -> None:
    p = parser(__doc__.splitlines()[0], seeds=10, steps=400)
    args = p.parse_args()
    jobs = [(seed, labels, args.steps) for seed in range(args.seeds) for labels in ("domain", "control")]
    started = time.perf_counter()
    with Pool(min(args.workers, 2)) as pool:
        results = pool.map(one_run, jobs)
    done = summarise(results)
    meta = settings(args, total_seconds=time.perf_counter() - started, summary=done["summary"],
                    runs=[{k: v for k, v in r.items() if k != "windows"} for r in results])
    stem = f"group_specialisation{'_' + args.tag if args.tag else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    write_results([], args.out, stem, meta)
    done["rows"].to_csv(args.out / f"{stem}.csv", index=False)  # after write_results, which writes an empty one
    print(f"{len(results)} runs in {meta['total_seconds']:.0f} s -> {args.out / stem}.json")


if __name__ == "__main__":
    main()
