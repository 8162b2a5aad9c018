"""Where redundant_cka's default comes from: linear CKA between experts in the healthy sample runs.

Retrains the sample runs that must show no expert alarm (scripts/make_sample_runs.py: their
settings and seeds, gradient conflict off) with expert similarity at its default (every 50 steps), and
prints per run the largest and the median pairwise CKA over the last ``redundant_steps`` measurements
(the finding's window) and over the whole run. Census runs are skipped when the data is not available.

    python scripts/experiments/similarity_calibration.py [--steps N] [--runs mmoe-p0.5 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from make_sample_runs import RUNS, census_available

import gatewatch as gw
from gatewatch.quantities.similarity.read import recent
from gatewatch.rules import Thresholds
from gatewatch.training import train

HEALTHY = ["mmoe-p0.5", "mmoe-p0.5-gatedrop0.1", "omoe-p0.5", "ple-p0.5", "census-mmoe"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the sample run's)")
    parser.add_argument("--runs", nargs="*", default=HEALTHY)
    args = parser.parse_args()
    torch.set_num_threads(1)
    th = Thresholds()
    census = census_available()
    print(f"{'run':<24} {'pairs':>5} {'recent max':>10} {'recent median':>13} {'run max':>8}  most similar pair")
    with tempfile.TemporaryDirectory() as root:
        for run in (r for r in RUNS if r.name in args.runs):
            if run.census and not census:
                continue
            changes: dict[str, object] = {"conflict_every": None}  # similarity_every: GateWatch's default, 50
            if args.steps:
                changes["steps"] = args.steps
            train(dataclasses.replace(run.config, **changes), Path(root) / run.name, progress=False)
            loaded = gw.load_run(Path(root) / run.name)
            table, last = loaded.table("similarity"), recent(loaded, int(th.redundant_steps))
            by_pair = last.groupby(["pool", "expert_a", "expert_b"])["cka"].min()
            top = by_pair.idxmax()
            print(f"{run.name:<24} {len(by_pair):>5} {by_pair.max():>10.3f} {by_pair.median():>13.3f} "
                  f"{table['cka'].max():>8.3f}  {top[0]}: {top[1]} ~ {top[2]}", flush=True)


if __name__ == "__main__":
    main()
