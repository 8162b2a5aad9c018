"""Regenerate sample_runs/: small real training runs with GateWatch attached, each with its checkpoint.

    python scripts/make_sample_runs.py            # all runs (a few minutes on 2 CPU cores)
    python scripts/make_sample_runs.py --only mmoe-p0.5 omoe-p0.5

Every run has fixed seeds and says what it is meant to show; after training, the script checks that
gatewatch's findings agree (e.g. the polarized run has a ``polarization`` finding, the healthy runs have
none) and fails loudly if one does not. Every run is made by ``gatewatch.training.train`` (the router run with
its skewed start, scripts/router_sample.py), so each carries its checkpoint, its model factory and its data
reference, ``summary.json`` and the expert similarity; ``tests/test_sample_runs_fresh.py`` checks that each run
holds every table the current version writes for its configuration. The census-income runs need the data archive
(downloaded once with pip, see gatewatch.data.load_census); without it they are skipped and the script says so.
Writes sample_runs/<name>/ (run.json, summary.json, tables/, checkpoint.pt, model.json, metrics.json) and
sample_runs/README.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import router_sample
import torch

import gatewatch as gw
from gatewatch.data.census import fetch_archive
from gatewatch.training import TrainConfig, train
from gatewatch.training.loop import ModelBuilder, supports_conflict

REPO = Path(__file__).resolve().parents[1]
ALARMS = frozenset({"polarization", "collapse", "dead_expert", "input_independent", "unstable", "nonfinite"})
SYNTHETIC = {"correlation": 0.5, "n_train": 10_000, "seed": 0}
CONFLICT_EVERY = 20 if supports_conflict() else None
SPARSE_RUN = "qwen3-moe-domains"


@dataclass(frozen=True)
class SampleRun:
    """One sample run: its settings, what it shows, and the findings it must (not) have."""

    name: str
    shows: str
    config: TrainConfig
    expect: frozenset[str] = frozenset()  # findings that must fire
    forbid: frozenset[str] = field(default=ALARMS)  # findings that must not fire
    builder: ModelBuilder | None = None  # builds the model instead of the reference one (its architecture)

    @property
    def census(self) -> bool:
        return self.config.data == "census"


def config(**kwargs: object) -> TrainConfig:
    base: dict[str, object] = {"data": "synthetic", "data_kwargs": SYNTHETIC, "steps": 3000, "batch_size": 256,
                               "lr": 1e-3, "seed": 0, "every": 20, "flush_every": 500, "eval_every": 500,
                               "flush_secs": None,  # flush by steps only: the same files on any machine
                               "tensorboard": False, "conflict_every": CONFLICT_EVERY, "similarity_every": 50}
    return TrainConfig(**{**base, **kwargs})  # type: ignore[arg-type]


def census(**kwargs: object) -> TrainConfig:
    return config(data="census", data_kwargs={}, steps=2000, eval_every=500, **kwargs)


RUNS = [
    SampleRun("mmoe-p0.5", "MMoE, 8 experts, synthetic data (task correlation 0.5): healthy gates and experts",
              config(model="mmoe")),
    SampleRun("mmoe-p0.5-gatedrop0.1", "the same MMoE with 10% gate dropout (YouTube's remedy)",
              config(model="mmoe", gate_dropout=0.1)),
    SampleRun("omoe-p0.5", "one gate shared by both tasks (OMoE), same data", config(model="omoe")),
    SampleRun("ple-p0.5", "PLE, 2 levels, 2 task-specific + 2 shared experts per level, named experts; at the "
              "last level each task leans on its own experts and a shared expert may be left almost unused",
              config(model="ple", model_kwargs={"n_levels": 2, "n_specific": 2, "n_shared": 2}),
              forbid=ALARMS - {"dead_expert"}),
    SampleRun("census-mmoe", "MMoE, 8 experts, census-income (income, marital status), lr 1e-3: healthy gates "
              "and experts",
              census(model="mmoe")),
    SampleRun("mmoe-polarized", "census MMoE, 4 experts, lr 1e-2: the income gate polarizes onto one expert",
              census(model="mmoe", model_kwargs={"n_experts": 4}, lr=1e-2),
              expect=frozenset({"polarization"}), forbid=frozenset()),
    SampleRun("mmoe-collapsed", "census MMoE, 8 experts, softmax temperature 0.1, lr 1e-2, seed 1: experts "
              "collapse, most of them dead",
              census(model="mmoe", model_kwargs={"n_experts": 8, "gate_temperature": 0.1}, lr=1e-2, seed=1),
              expect=frozenset({"collapse", "dead_expert"}), forbid=frozenset()),
    SampleRun(SPARSE_RUN, "tiny transformers Qwen3-MoE (2 MoE layers, 8 fused experts, top-2 routers) with a flag "
              "(binary) and a score (regression) tower, on token sequences from 3 domains (no domain marker), each "
              "batch labelled with its domains (sample groups: per-domain routing and specialisation); per-expert "
              "conflict and expert similarity on the fused experts, checkpoint for ablations through the routers",
              config(model="sparse_moe", model_kwargs={"n_experts": 8}, data="domains", data_kwargs={"seed": 0},
                     steps=600, batch_size=64, lr=3e-3, every=10, flush_every=200, eval_every=200,
                     similarity_every=50),
              forbid=ALARMS - {"dead_expert"}),
    SampleRun("mmoe-stale-polarized", "census MMoE, 8 experts, lr 1e-3 (healthy when synchronous) trained 1,000 "
              "steps on gradients 32 steps stale (gatewatch.training.staleness): the income gate polarizes",
              config(model="mmoe", data="census", data_kwargs={}, steps=1000, eval_every=500, staleness=32),
              expect=frozenset({"polarization"}), forbid=frozenset()),
    SampleRun(router_sample.NAME, router_sample.SHOWS,
              config(model="sparse_moe", model_kwargs=router_sample.MODEL_KWARGS, data="domains",
                     data_kwargs=router_sample.DATA_KWARGS, **router_sample.TRAIN),
              expect=router_sample.EXPECT, forbid=frozenset({"nonfinite"}), builder=router_sample.skewed),
]


def make(job: tuple[SampleRun, Path]) -> tuple[str, list[str], dict, float]:
    """Train one sample run into ``out/name``; return its name, findings, test metrics and seconds."""
    run, out = job
    torch.set_num_threads(1)
    target = out / run.name
    shutil.rmtree(target, ignore_errors=True)
    started = time.perf_counter()
    result = train(run.config, target, progress=False, model_builder=run.builder)
    findings = sorted({f.code for f in gw.find(gw.load_run(target))})
    return run.name, findings, result.metrics["test"], time.perf_counter() - started


def census_available() -> bool:
    try:
        fetch_archive()
    except RuntimeError as err:
        print(f"census-income is not available, its runs are skipped:\n{err}", file=sys.stderr)
        return False
    return True


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_index(out: Path, runs: list[SampleRun]) -> None:
    lines = ["# Sample runs", "", "Small real runs made by `python scripts/make_sample_runs.py` (fixed seeds; "
             "regenerate with that one command). Each folder is a gatewatch run directory with `checkpoint.pt` "
             "and `model.json`, so the ablation tools can rebuild its model.", "",
             "| run | what it shows | findings | size |", "| --- | --- | --- | --- |"]
    for run in runs:
        path = out / run.name
        if not path.is_dir():
            continue
        codes = ", ".join(sorted({f.code for f in gw.find(gw.load_run(path))})) or "none"
        lines.append(f"| `{run.name}` | {run.shows} | {codes} | {folder_size(path) / 1e6:.2f} MB |")
    lines += ["", "Open them with `gatewatch dashboard sample_runs`, or `gatewatch report sample_runs/<run>`.", ""]
    (out / "README.md").write_text("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "sample_runs", help="folder of the sample runs")
    p.add_argument("--only", nargs="+", choices=[r.name for r in RUNS], help="make only these runs")
    p.add_argument("--workers", type=int, default=2, help="processes (at most 2)")
    args = p.parse_args()
    runs = [r for r in RUNS if not args.only or r.name in args.only]
    if any(r.census for r in runs) and not census_available():
        runs = [r for r in runs if not r.census]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    problems = []
    by_name = {r.name: r for r in runs}
    with Pool(max(1, min(args.workers, 2, len(runs)))) as pool:
        for name, findings, test, seconds in pool.imap_unordered(make, [(r, args.out) for r in runs]):
            run = by_name[name]
            metrics = ", ".join(f"{t} {k} {v:.4f}" for t, m in test.items() for k, v in m.items() if k != "loss")
            print(f"{name:<24} {seconds:5.0f}s  findings: {', '.join(findings) or 'none':<40} {metrics}", flush=True)
            missing, unwanted = run.expect - set(findings), run.forbid & set(findings)
            if missing or unwanted:
                problems.append(f"{name}: expected {sorted(run.expect)} and none of {sorted(run.forbid)}, "
                                f"got {findings}")
    write_index(args.out, RUNS)
    total = sum(folder_size(args.out / r.name) for r in RUNS if (args.out / r.name).is_dir())
    print(f"done in {time.perf_counter() - started:.0f}s; sample runs take {total / 1e6:.1f} MB in {args.out}")
    for problem in problems:
        print(f"NOT AS INTENDED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
