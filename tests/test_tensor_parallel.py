"""Tensor parallelism on a 2 x 2 mesh (``dp`` x ``tp``, 4 gloo processes on CPU) against a single-process replay.

A small sparse MoE (float64): an input projection, a replicated top-2 router over 4 experts, each expert an MLP
whose two ``nn.Linear`` layers are split over the ``tp`` ranks with ``torch.distributed.tensor.parallel``
(``ColwiseParallel`` then ``RowwiseParallel``: real tensor parallelism, the hidden layer sharded, the output
all-reduced), and one head per task. The two ``tp`` ranks of a data-parallel group see the same tokens; the two
``dp`` groups see different batches (10 and 14 samples, shifted data), and their gradients are averaged over ``dp``.

The reference is one process that replays the same training: per step it runs both data-parallel batches through
the model and backpropagates the mean over ``dp`` of each batch's task losses. Every gate, router and loss figure
must equal it (1e-5): each token is counted once, not once per ``tp`` rank. So must gradient conflict (every scope:
parameters, modules, "all"; purity) and the per-expert conflict: each ``tp`` rank's statistics of its shards and,
counted once, of the parameters it holds whole, summed over ``tp``, of the gradients averaged over ``dp`` only.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _distributed import launch_and_replay, same_table, train_on_mean
from _grouped_experts import TopKRouter
from torch import nn

import gatewatch as gw
from gatewatch.quantities.conflict.layout import ConflictError
from gatewatch.quantities.conflict.read import expert_table
from gatewatch.quantities.conflict.shards import tensor_split

pytestmark = pytest.mark.slow  # 4 processes

TASKS = ["a", "b"]
SIZES = {0: 10, 1: 14}  # per data-parallel rank
WORLD, STEPS, EVERY, LR = 4, 3, 1, 0.1
N_EXPERTS = 4
TABLES = ("gates", "shares", "routers", "router_experts", "losses", "conflict", "purity")


class LinearExpertsMoE(nn.Module):
    """Input projection, one top-k MoE layer whose experts are ``Linear -> SiLU -> Linear``, one head per task."""

    def __init__(self, dim: int = 8, hidden: int = 12, n_experts: int = N_EXPERTS, top_k: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, dim)
        self.router = TopKRouter(dim, n_experts, top_k)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
                                     for _ in range(n_experts))
        self.heads = nn.ModuleDict({t: nn.Linear(dim, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(x)
        _, weights, indices = self.router(h)
        mixed = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(indices == e)
            if len(token):
                mixed = mixed.index_add(0, token, expert(h[token]) * weights[token, slot, None])
        h = h + mixed
        return {t: head(h).squeeze(-1) for t, head in self.heads.items()}


def new_model() -> LinearExpertsMoE:
    return LinearExpertsMoE().double()


def task_losses(model: nn.Module, step: int, dp_rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    x = torch.randn(SIZES[dp_rank], 6, generator=g, dtype=torch.float64) + 0.5 * dp_rank
    out = model(x)
    return {"a": F.mse_loss(out["a"], x[:, 0] - x[:, 1]), "b": F.mse_loss(out["b"], x[:, 2] * x[:, 3])}


def watch_for(model: nn.Module, log_dir: Path, mesh: object = None) -> gw.GateWatch:
    return gw.GateWatch(model, tasks=TASKS, log_dir=log_dir, every=EVERY, flush_every=EVERY, tensorboard=False,
                        mesh=mesh, conflict_every=1)


def worker(root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        dp_rank, dp_group = mesh.get_local_rank(0), mesh["dp"].get_group()
        model = new_model()
        for expert in model.experts:
            parallelize_module(expert, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        assert isinstance(model.experts[0][0].weight, DTensor)  # the experts really are split over 'tp'
        assert tensor_split("w", distribute_tensor(torch.zeros(4, 6), mesh["tp"], [Shard(1)]), tp=True) == 1
        along_dp = distribute_tensor(torch.zeros(4, 6), mesh, [Shard(0), Replicate()])
        with pytest.raises(ConflictError, match=r"parameter 'w' is a DTensor sharded along the mesh dimension 'dp'"):
            tensor_split("w", along_dp, tp=True)  # its slices along 'dp' cannot be told apart: refused by name
        opt = torch.optim.SGD(model.parameters(), lr=LR, foreach=False)
        with watch_for(model, Path(root) / "run", mesh) as watch:
            for step in range(1, STEPS + 1):
                watch.backward(task_losses(model, step, dp_rank))
                for p in model.parameters():  # data parallel: the mean of the two batches' gradients
                    if p.grad is None:  # an expert no token of this batch chose
                        p.grad = torch.zeros_like(p)
                    local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                    dist.all_reduce(local, group=dp_group)
                    local.div_(2)
                opt.step()
                opt.zero_grad()
                watch.step()
        state = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                 for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(state, Path(root) / "mesh.pt")
    finally:
        dist.destroy_process_group()


def replay(log_dir: Path) -> dict[str, torch.Tensor]:
    """The same training in one process: both data-parallel batches per step, the mean of their losses."""
    model = new_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, foreach=False)
    return train_on_mean(model, watch_for(model, log_dir), opt, STEPS,
                         lambda step: [task_losses(model, step, r) for r in SIZES])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return launch_and_replay("test_tensor_parallel", tmp_path_factory.mktemp("tensor-parallel"), replay,
                             world=WORLD, timeout=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("table", TABLES)
def test_dp_x_tp_mesh_equals_the_replay(runs: Path, table: str) -> None:
    got, want = gw.load_run(runs / "run"), gw.load_run(runs / "replay")
    same_table(table, got.table(table), want.table(table))


@pytest.mark.timeout(300)
def test_every_token_is_counted_once_and_training_matches(runs: Path) -> None:
    run = gw.load_run(runs / "run")
    assert run.status == "finished" and run.problems == [] and run.meta["world_size"] == WORLD
    assert set(run.table("routers")["tokens"]) == {sum(SIZES.values()) * EVERY}  # not once per 'tp' rank
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["replay", "run"]  # only rank 0 wrote
    replayed = torch.load(runs / "replay.pt")
    for name, value in torch.load(runs / "mesh.pt").items():
        torch.testing.assert_close(value, replayed[name], rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.timeout(300)
def test_per_expert_conflict_covers_every_expert_once_as_one_process(runs: Path) -> None:
    run = gw.load_run(runs / "run")
    got, want = expert_table(run), expert_table(gw.load_run(runs / "replay"))
    same_table("expert_conflict", got, want)
    experts = [f"experts.{i}" for i in range(N_EXPERTS)]
    assert got.groupby("step")["module"].apply(sorted).tolist() == [experts] * STEPS  # one pair (a, b) per step
    conflict = run.meta["conflict"]
    assert conflict["disabled"] is None and conflict["tp_ranks"] == 2 and "ep_ranks" not in conflict
    whole = sum(p.numel() for n, p in new_model().named_parameters() if not n.startswith("heads."))
    assert conflict["elements"] == whole  # every parameter whole, not this rank's shards
