"""GateWatch under torch.distributed: 2 gloo processes (on the CPU, or sharing the GPU when there is one)
against one process that saw both shards.

Each rank trains the same small MMoE wrapped in DDP on its own batches. The reference is one process
that, per step, runs both ranks' batches through the same model and backpropagates the mean of the
two ranks' losses (what DDP's gradient averaging computes), so the weights, and therefore every gate
statistic, must be the same. Two extra parameter-free gates cover the corner cases of the reduce:
``aux`` runs on rank 1 only and only from step 5 (after the first flush), and ``probe`` gets a NaN
row on rank 1 at step 3 and on rank 0 at step 4 (the first non-finite step is a minimum over ranks).
The workers also count the collectives each flush issues. A second pair of DDP runs, with and without
gradient-conflict measurement, checks that measuring per-task gradients adds no gradient all-reduce
and leaves the training unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from _distributed import launch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gatewatch as gw

pytestmark = pytest.mark.slow  # 2 processes per run (see `make test-fast`)

TASKS = ["a", "b"]
GATES = {"a": "gates.a.1", "b": "gates.b.1", "aux": "aux", "probe": "probe"}
STEPS, EVERY, FLUSH_EVERY, WORLD = 10, 2, 4, 2  # DDP flushes at steps 2 (the first), 6 and 10; close adds none
AUX_FROM = 5  # step from which rank 1 runs the aux gate
NAN_AT = {1: 3, 0: 4}  # rank -> step with a NaN row in the probe gate's input
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # both ranks share one GPU (gloo)


class TinyMMoE(nn.Module):
    def __init__(self, d: int = 6, n_experts: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, 8), nn.ReLU()) for _ in range(n_experts))
        self.gates = nn.ModuleDict({t: nn.Sequential(nn.Linear(d, n_experts), nn.Softmax(-1)) for t in TASKS})
        self.towers = nn.ModuleDict({t: nn.Linear(8, 1) for t in TASKS})
        self.aux, self.probe = nn.Softmax(-1), nn.Softmax(-1)
        self.run_aux = False
        self.to(DEVICE)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> list[torch.Tensor]:
        self.probe(noise)  # parameter-free gates whose outputs nothing uses
        if self.run_aux:
            self.aux(2 * noise)
        f = torch.stack([e(x) for e in self.experts], 1)
        return [self.towers[t]((self.gates[t](x).unsqueeze(-1) * f).sum(1)).squeeze(-1) for t in TASKS]


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 6, generator=g)
    noise = torch.randn(16, 4, generator=g)
    if NAN_AT.get(rank) == step:
        noise[5, 1] = float("nan")
    y = (x[:, 0] > 0).float()
    return x.to(DEVICE), noise.to(DEVICE), y.to(DEVICE)


def task_losses(outputs: list[torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
    bce = nn.functional.binary_cross_entropy_with_logits
    return {"a": bce(outputs[0], y), "b": bce(outputs[1], 1 - y)}


def watch_for(model: nn.Module, log_dir: Path) -> gw.GateWatch:
    return gw.GateWatch(model, tasks=TASKS, gates=GATES, log_dir=log_dir, every=EVERY, flush_every=FLUSH_EVERY,
                        on_nonfinite="ignore")  # the NaN rows are on purpose


def worker(root: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)  # MASTER_ADDR / MASTER_PORT from the launcher
    try:
        train_ddp(rank, root)
        conflict_runs(rank, root)
    finally:
        dist.destroy_process_group()


def train_ddp(rank: int, root: str) -> None:
    """The run compared with one process; also saves the number of all_reduce calls of each flush."""
    model = TinyMMoE()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    watch = watch_for(ddp, Path(root) / f"rank{rank}")  # rank 1 must not create its folder
    all_reduce = dist.all_reduce
    collectives = count_collectives(watch)
    try:
        for step in range(1, STEPS + 1):
            x, noise, y = batch(step, rank)
            model.run_aux = rank == 1 and step >= AUX_FROM
            watch.backward(task_losses(ddp(x, noise), y))
            opt.step()
            opt.zero_grad()
            watch.step()
        watch.close()
    finally:
        dist.all_reduce = all_reduce
    (Path(root) / f"collectives-{rank}.json").write_text(json.dumps(collectives))


def count_collectives(watch: gw.GateWatch) -> list[int]:
    """The number of all_reduce calls of each flush of ``watch`` (filled in as it runs)."""
    counts: list[int] = []
    all_reduce, flush = dist.all_reduce, watch.flush

    def counting_all_reduce(*args: object, **kwargs: object) -> object:
        counts[-1] += 1
        return all_reduce(*args, **kwargs)

    def counting_flush() -> None:
        counts.append(0)
        flush()

    dist.all_reduce = counting_all_reduce  # type: ignore[assignment]
    watch.flush = counting_flush  # type: ignore[method-assign]
    return counts


def single_process(log_dir: Path) -> None:
    """What the two ranks compute together, in one process."""
    model = TinyMMoE()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    watch = watch_for(model, log_dir)
    for step in range(1, STEPS + 1):
        totals = []
        for rank in range(WORLD):
            x, noise, y = batch(step, rank)
            model.run_aux = rank == 1 and step >= AUX_FROM
            totals.append(watch.log_losses(task_losses(model(x, noise), y)))
        (sum(totals) / WORLD).backward()
        opt.step()
        opt.zero_grad()
        watch.step()
    watch.close()


KEYS = {"gates": ["step", "gate"], "shares": ["step", "gate", "expert"], "hist": ["step", "gate", "bin"],
        "experts": ["step", "expert"], "losses": ["step", "task"], "events": ["step", "source"]}


def assert_same_table(name: str, got: pd.DataFrame, want: pd.DataFrame) -> None:
    got = got.sort_values(KEYS[name]).reset_index(drop=True)
    want = want.sort_values(KEYS[name]).reset_index(drop=True)
    assert len(got) == len(want) > 0, name
    for col in want.columns:
        if pd.api.types.is_float_dtype(want[col]):
            np.testing.assert_allclose(got[col].to_numpy(float), want[col].to_numpy(float), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name}.{col}")
        else:
            assert got[col].astype(str).tolist() == want[col].astype(str).tolist(), f"{name}.{col}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[gw.Run, gw.Run, Path]:
    root = tmp_path_factory.mktemp("ddp")
    launch("test_ddp", "worker", root, world=WORLD, timeout=150)
    single_process(root / "single")
    return gw.load_run(root / "rank0"), gw.load_run(root / "single"), root


@pytest.mark.timeout(180)
@pytest.mark.parametrize("table", list(KEYS))
def test_reduced_tables_equal_one_process_that_saw_both_shards(runs: tuple[gw.Run, gw.Run, Path], table: str) -> None:
    ddp, single, _ = runs
    assert_same_table(table, ddp.table(table), single.table(table))


@pytest.mark.timeout(180)
def test_corner_cases_of_the_reduce(runs: tuple[gw.Run, gw.Run, Path]) -> None:
    ddp, _, _ = runs
    gates = ddp.gates.set_index(["gate", "step"])
    # the window of steps 3-4 holds rank 1's NaN at step 3 and rank 0's at step 4: the minimum, not a sum
    assert gates.loc[("probe", 4), "first_nonfinite_step"] == 3
    assert gates.loc[("probe", 4), "nonfinite"] == 2
    assert ddp.events["step"].tolist() == [3]
    # aux ran on rank 1 only, from step 5: rank 0 learnt its expert count at the second flush
    assert gates.loc[("aux", 6), "samples"] == 2 * 16
    assert gates.loc[("aux", 10), "samples"] == 2 * 16
    assert "aux" not in ddp.gates[ddp.gates["step"] < AUX_FROM]["gate"].tolist()
    aux = next(g for g in ddp.meta["gates"] if g["name"] == "aux")
    assert aux["experts"] == 4 and aux["expert_names"] == [f"aux:{i}" for i in range(4)]
    # every window counts both ranks' samples
    assert (gates.xs("a", level="gate")["samples"] == EVERY * WORLD * 16).all()


@pytest.mark.timeout(180)
def test_only_rank_zero_writes(runs: tuple[gw.Run, gw.Run, Path]) -> None:
    ddp, single, root = runs
    assert not (root / "rank1").exists()
    assert ddp.meta["world_size"] == 2 and single.meta["world_size"] == 1
    assert ddp.status == "finished" and ddp.problems == []
    assert len(list((root / "rank0" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [g["name"] for g in ddp.meta["gates"]] == [g["name"] for g in single.meta["gates"]]


@pytest.mark.timeout(180)
def test_one_collective_per_clean_flush(runs: tuple[gw.Run, gw.Run, Path]) -> None:
    root = runs[2]
    for rank in range(WORLD):
        counts = json.loads((root / f"collectives-{rank}.json").read_text())
        # flush 1 (step 2): agree on the state sizes (aux unknown) + sum; flush 2 (step 6): agree (aux still
        # unknown before it) + sum + min (NaN at steps 3-4); flush 3 (step 10): the sum alone; close: none
        assert counts == [2, 3, 1, 0]


def conflict_runs(rank: int, root: str) -> None:
    """Train twice under DDP, without and with conflict measurement; save the weights and the number of
    gradient buckets DDP all-reduced (counted by a communication hook)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    for conflict_every in (0, 1):
        model = TinyMMoE()
        ddp = DistributedDataParallel(model)
        buckets = [0]

        def counting_hook(state, bucket, buckets=buckets):  # type: ignore[no-untyped-def]  # DDP checks hints
            buckets[0] += 1
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        log_dir = Path(root) / f"conflict{conflict_every}-rank{rank}"
        with gw.GateWatch(ddp, tasks=TASKS, gates=GATES, log_dir=log_dir, every=2,
                          conflict_every=conflict_every) as watch:
            for step in range(1, 5):
                x, noise, y = batch(100 + step, rank)
                watch.backward(task_losses(ddp(x, noise), y))
                opt.step()
                opt.zero_grad()
                watch.step()
        saved = Path(root) / f"conflict{conflict_every}-{rank}.pt"
        torch.save({"buckets": buckets[0], "state": model.state_dict()}, saved)


@pytest.mark.timeout(180)
def test_conflict_under_ddp_adds_no_gradient_all_reduce(runs: tuple[gw.Run, gw.Run, Path]) -> None:
    tmp_path = runs[2]
    for rank in range(WORLD):
        plain, measured = (torch.load(tmp_path / f"conflict{c}-{rank}.pt", map_location="cpu") for c in (0, 1))
        assert measured["buckets"] == plain["buckets"] > 0  # the same gradient all-reduces, step for step
        for name, value in plain["state"].items():
            torch.testing.assert_close(measured["state"][name], value, msg=name)  # training unchanged
    run = gw.load_run(tmp_path / "conflict1-rank0")
    assert len(run.table("conflict")) > 0 and set(run.table("conflict")["step"]) == {1, 2, 3, 4}
    assert not (tmp_path / "conflict1-rank1").exists() and not (tmp_path / "conflict0-rank1").exists()
