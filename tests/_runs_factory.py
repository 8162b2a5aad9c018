"""Run directories for the dashboard and figure tests.

Real runs come from training tiny models with :class:`gatewatch.GateWatch`; the bad inputs (cut off,
corrupt Parquet, empty folder, not a run) are made from real runs or plain folders. The synthetic
writer fills the tables of a long run directly (no training) for the dashboard benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

import gatewatch as gw
from gatewatch.schema import conform
from gatewatch.sinks.run_writer import RunDirWriter


class TinyMMoE(nn.Module):
    """A small MMoE: E linear experts, one ``Linear -> Softmax`` gate per task, one linear tower per task."""

    def __init__(self, tasks: Sequence[str], experts: int, dim: int = 12, hidden: int = 8) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.ReLU()) for _ in range(experts))
        self.gates = nn.ModuleDict({t: nn.Sequential(nn.Linear(dim, experts), nn.Softmax(-1)) for t in tasks})
        self.towers = nn.ModuleDict({t: nn.Linear(hidden, 1) for t in tasks})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = torch.stack([e(x) for e in self.experts], 1)
        return [self.towers[t]((self.gates[t](x).unsqueeze(-1) * f).sum(1)).squeeze(-1) for t in self.tasks]


class TinyRouters(nn.Module):
    """Two layers of sparse routers (Linear logits, softmax applied functionally, top-2 of 4 experts)."""

    def __init__(self, dim: int = 12, experts: int = 4) -> None:
        super().__init__()
        self.routers = nn.ModuleList(nn.Linear(dim, experts) for _ in range(2))
        self.experts = nn.ModuleList(
            nn.ModuleList(nn.Linear(dim, dim) for _ in range(experts)) for _ in range(2)
        )
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for router, experts in zip(self.routers, self.experts, strict=True):
            w = torch.softmax(router(x), -1)
            top, idx = w.topk(2, -1)
            out = torch.stack([e(x) for e in experts], 1)  # [N, E, D]
            x = x + (top.unsqueeze(-1) * out.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))).sum(1)
        return self.head(x).squeeze(-1)


def train_mmoe(
    path: Path, *, tasks: Sequence[str] = ("ctr", "like"), experts: int = 4, steps: int = 120,
    polarize: str | None = None, seed: int = 0, every: int = 10, flush_every: int = 40,
    config: dict | None = None, conflict_every: int = 0, pace: float = 0.0,
) -> Path:
    """Train a tiny MMoE for ``steps`` steps under GateWatch; ``polarize`` pins that task's gate to expert 0;
    ``conflict_every`` > 0 also measures gradient conflict between the tasks; ``pace`` sleeps that many seconds
    per step (a run that stays live long enough to watch)."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    model = TinyMMoE(tasks, experts)
    if polarize is not None:
        linear = model.gates[polarize][0]
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.copy_(torch.tensor([20.0] + [0.0] * (experts - 1)))
        linear.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with gw.GateWatch(model, tasks=list(tasks), log_dir=path, every=every, flush_every=flush_every,
                      tensorboard=False, config=config, conflict_every=conflict_every) as watch:
        for _ in range(steps):
            x = torch.randn(64, 12)
            targets = [(x[:, 0] + 0.3 * x[:, 1 + i] > 0).float() for i in range(len(tasks))]  # related tasks
            preds = model(x)
            watch.backward({t: nn.functional.binary_cross_entropy_with_logits(p, y)
                            for t, p, y in zip(tasks, preds, targets, strict=True)})
            opt.step()
            opt.zero_grad()
            watch.step()
            time.sleep(pace)
    return path


def train_routers(path: Path, *, steps: int = 80, seed: int = 0) -> Path:
    """A run of per-layer sparse routers: no tasks, one gate per layer."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    model = TinyRouters()
    gates = {f"layer{i}": gw.Gate(f"routers.{i}", output="logits", top_k=2) for i in range(2)}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with gw.GateWatch(model, gates=gates, log_dir=path, every=10, flush_every=40, tensorboard=False) as watch:
        for _ in range(steps):
            x = torch.randn(64, 12)
            (model(x) - x[:, 0]).pow(2).mean().backward()  # no task losses: a run of layers, not tasks
            opt.step()
            opt.zero_grad()
            watch.step()
    return path


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def cut_off(path: Path) -> Path:
    """Make a finished run look like its training process died mid-run."""
    meta = json.loads((path / "run.json").read_text())
    meta.update(status="running", ended=None, pid=dead_pid())
    (path / "run.json").write_text(json.dumps(meta))
    return path


def make_live(path: Path) -> Path:
    """Make a run look like it is still being written (its pid is this test process)."""
    meta = json.loads((path / "run.json").read_text())
    meta.update(status="running", ended=None, pid=os.getpid())
    (path / "run.json").write_text(json.dumps(meta))
    return path


def corrupt(path: Path) -> Path:
    """Add a garbage Parquet part and a half-written (truncated) copy of a real part to the gates table."""
    folder = path / "tables" / "gates"
    real = sorted(folder.glob("*.parquet"))[0]
    (folder / "part-900001.parquet").write_bytes(b"PAR1 this is not parquet")
    data = real.read_bytes()
    (folder / "part-900002.parquet").write_bytes(data[: len(data) // 2])
    return path


def conflict_frame(steps: Sequence[int], tasks: Sequence[str], params: Sequence[str], seed: int = 0,
                   fight: Sequence[str] = ()) -> pd.DataFrame:
    """Conflict rows (params, their modules and "all") for every task pair: ``fight`` params have negative cosine."""
    rng = np.random.default_rng(seed)
    pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1:]]
    modules = sorted({p.rsplit(".", 1)[0] for p in params})
    names = [("param", p) for p in params] + [("module", m) for m in modules] + [("all", "all")]
    n_steps, n_names, n_pairs = len(steps), len(names), len(pairs)
    base = np.array([-0.4 if name in fight else 0.3 for _, name in names])
    cosine = np.clip(base[None, :, None] + rng.normal(0, 0.2, (n_steps, n_names, n_pairs)), -1, 1)
    norm_a = rng.uniform(0.1, 1.0, cosine.shape)
    norm_b = rng.uniform(0.1, 1.0, cosine.shape)
    below = np.cumsum(cosine < 0, axis=0)  # Recon's count (threshold 0), per name and pair
    grid = {
        "step": np.repeat(np.asarray(steps), n_names * n_pairs),
        "scope": np.tile(np.repeat([s for s, _ in names], n_pairs), n_steps),
        "name": np.tile(np.repeat([n for _, n in names], n_pairs), n_steps),
        "task_a": np.tile([a for a, _ in pairs], n_steps * n_names),
        "task_b": np.tile([b for _, b in pairs], n_steps * n_names),
        "cosine": cosine.ravel(),
        "sign_conflict": np.clip(0.5 - cosine.ravel() / 2 + rng.normal(0, 0.02, cosine.size), 0, 1),
        "norm_a": norm_a.ravel(), "norm_b": norm_b.ravel(),
        "magnitude_sim": (2 * norm_a * norm_b / (norm_a**2 + norm_b**2)).ravel(),
        "below": below.ravel(), "zero_grad": np.zeros(cosine.size, dtype=bool), "elements": np.full(cosine.size, 64),
    }
    return conform("conflict", pd.DataFrame(grid))


def make_runs(root: Path) -> dict[str, Path]:
    """The standard set of runs under ``root``: healthy, polarized, one expert, one task, routers,
    cut off, corrupt, and a live one (conflict measured on the healthy and polarized runs)."""
    root.mkdir(parents=True, exist_ok=True)
    runs = {
        "healthy": train_mmoe(root / "healthy", config={"gate_dropout": 0.1}, conflict_every=10),
        "polarized": train_mmoe(root / "polarized", polarize="like", conflict_every=10),
        "one_expert": train_mmoe(root / "one_expert", experts=1, steps=60),
        "one_task": train_mmoe(root / "one_task", tasks=("ctr",), steps=60),
        "routers": train_routers(root / "routers"),
        "cut_off": cut_off(train_mmoe(root / "cut_off", steps=60, seed=1)),
        "corrupt": corrupt(train_mmoe(root / "corrupt", steps=60, seed=2)),
        "live": make_live(train_mmoe(root / "live", steps=60, seed=3)),
    }
    return runs


def purity_frame(steps: Sequence[int], modules: Sequence[str], rng: np.random.Generator, bins: int = 10
                 ) -> pd.DataFrame:
    """GradDrop sign-purity histograms per step for each module and for "all" (mass near 0 and 1: agreement)."""
    names = [("module", m) for m in modules] + [("all", "all")]
    n = len(steps) * len(names)
    centre = np.abs(np.linspace(-1, 1, bins))  # U-shaped: most elements agree in sign
    counts = rng.poisson(100 * (0.2 + centre), (n, bins)).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    return conform("purity", pd.DataFrame({
        "step": np.repeat(np.asarray(steps), len(names) * bins),
        "scope": np.tile(np.repeat([s for s, _ in names], bins), len(steps)),
        "name": np.tile(np.repeat([m for _, m in names], bins), len(steps)),
        "bin": np.tile(np.arange(bins), n), "lo": np.tile(edges[:-1], n), "hi": np.tile(edges[1:], n),
        "count": counts.ravel(),
    }))



def make_bad_roots(root: Path) -> dict[str, Path]:
    """Folders that are not runs: an empty one and one of unrelated files."""
    empty = root / "empty"
    empty.mkdir(parents=True)
    foreign = root / "not_a_run"
    (foreign / "notes").mkdir(parents=True)
    (foreign / "notes" / "readme.txt").write_text("just notes")
    (foreign / "data.csv").write_text("a,b\n1,2\n")
    return {"empty": empty, "not_a_run": foreign}


def write_synthetic_run(
    path: Path, *, steps: int = 100_000, every: int = 10, tasks: int = 4, experts: int = 8,
    conflict_every: int = 50, params: int = 20, bins: int = 20, seed: int = 0, parts: int = 20,
) -> Path:
    """A long finished run written straight into the tables (no training), in ``parts`` Parquet files.

    Gates drift slowly from even to uneven routing; task 0's gate polarizes in the second half; the
    last expert dies. Conflict rows cover ``params`` parameter tensors every ``conflict_every`` steps.
    """
    rng = np.random.default_rng(seed)
    task_names = [f"task{i}" for i in range(tasks)]
    expert_names = [str(i) for i in range(experts)]
    window_steps = np.arange(every, steps + 1, every)
    n = len(window_steps)
    t = window_steps / steps
    logits = rng.normal(0, 0.3, (tasks, 1, experts)) * (1 + 4 * t[None, :, None])
    logits += rng.normal(0, 0.05, (tasks, n, experts))
    logits[:, :, -1] -= 6 * t  # the last expert dies
    logits[0, :, 0] += np.where(t > 0.5, 12 * (t - 0.5), 0)  # task 0 polarizes
    share = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # [tasks, n, experts]
    writer = RunDirWriter(path, compact_every=10_000)
    meta = {
        "format": "gatewatch-run/1", "name": path.name, "status": "finished", "steps": steps, "tasks": task_names,
        "gates": [{"name": tn, "task": tn, "level": 0, "experts": experts, "expert_names": expert_names}
                  for tn in task_names],
        "config": {"every": every, "flush_every": every * 10, "threshold": 0.9, "bins": bins},
    }
    writer.write_meta(meta)
    param_names = [f"experts.{i % experts}.layer{i // experts}" for i in range(params)]  # modules: experts.<i>
    conflict_steps = np.arange(conflict_every, steps + 1, conflict_every)
    for chunk in np.array_split(np.arange(n), parts):
        lo, hi = window_steps[chunk[0]], window_steps[chunk[-1]]
        tables = _synthetic_tables(window_steps[chunk], share[:, chunk], task_names, expert_names, bins, rng)
        cstep = conflict_steps[(conflict_steps >= lo) & (conflict_steps <= hi)]
        tables["conflict"] = conflict_frame(cstep, task_names, param_names, seed=int(lo), fight=param_names[:3])
        tables["purity"] = purity_frame(cstep, sorted({p.rsplit(".", 1)[0] for p in param_names}), rng)
        writer.write(tables)
    return path


def _synthetic_tables(steps: np.ndarray, share: np.ndarray, tasks: list[str], experts: list[str], bins: int,
                      rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    n_tasks, n, n_exp = share.shape
    ent = -(share * np.log(share)).sum(-1) / np.log(n_exp)  # [tasks, n]
    top = share.max(-1)
    gates = pd.DataFrame({
        "step": np.tile(steps, n_tasks), "gate": np.repeat(tasks, n), "task": np.repeat(tasks, n), "level": 0,
        "experts": n_exp, "samples": 2560.0, "entropy": (0.8 * ent).ravel(), "entropy_of_mean": ent.ravel(),
        "mutual_info": (0.2 * ent).ravel(), "effective_experts": np.exp(ent * np.log(n_exp)).ravel(),
        "polarization": np.clip(top * 1.1 - 0.1, 0, 1).ravel(), "max_weight": np.clip(top + 0.1, 0, 1).ravel(),
        "top_share": top.ravel(), "spread": 0.1, "drift": np.abs(rng.normal(0, 0.01, n_tasks * n)),
        "small_margin": np.nan, "nonfinite": 0.0,
    })
    shares = pd.DataFrame({
        "step": np.tile(np.repeat(steps, n_exp), n_tasks), "gate": np.repeat(tasks, n * n_exp),
        "expert": np.tile(np.arange(n_exp), n_tasks * n), "expert_name": np.tile(experts, n_tasks * n),
        "share": share.ravel(), "std": 0.05, "top1": share.ravel(), "selected": np.nan,
    })
    edges = np.linspace(0, 1, bins + 1)
    centre = np.clip((share * bins).astype(int), 0, bins - 1)  # [tasks, n, experts]
    counts = np.zeros((n_tasks, n, bins))
    np.put_along_axis(counts, centre, 320.0, axis=-1)
    hist = pd.DataFrame({
        "step": np.tile(np.repeat(steps, bins), n_tasks), "gate": np.repeat(tasks, n * bins),
        "bin": np.tile(np.arange(bins), n_tasks * n), "lo": np.tile(edges[:-1], n_tasks * n),
        "hi": np.tile(edges[1:], n_tasks * n), "count": counts.ravel(),
    })
    util = share.mean(0)  # [n, experts]
    experts_df = pd.DataFrame({
        "step": np.repeat(steps, n_exp), "expert": np.tile(experts, n), "utilization": util.ravel(),
        "reference": 1.0 / n_exp, "selected": np.nan, "gates": n_tasks,
    })
    losses = pd.DataFrame({
        "step": np.tile(steps, n_tasks), "task": np.repeat(tasks, n),
        "loss": (0.7 * np.exp(-np.tile(steps, n_tasks) / 30_000) + 0.2 + rng.normal(0, 0.01, n_tasks * n)),
    })
    return {name: conform(name, df) for name, df in
            (("gates", gates), ("shares", shares), ("hist", hist), ("experts", experts_df), ("losses", losses))}
