"""Expert parallelism on gloo processes against a single-process replay: a ``DeviceMesh`` with one ``ep`` dimension
(2 ranks), and a 2 x 2 ``dp`` x ``ep`` mesh (each expert shard held by two data-parallel replicas).

One torchtitan-style MoE layer (``tests/_grouped_experts.py``, float64): the input projection, the top-2 router
and the heads are replicated; the experts are held as one ``[E/2, ...]`` slice of ``w1``/``w2``/``w3`` per rank.
Each rank routes its own tokens, sends each (token, expert) pair to the rank that owns the expert with
``all_to_all_single`` (autograd-aware), and gets the experts' outputs back the same way. The ranks see different
batches (10, 14, 12 and 8 samples, shifted data); the replicated parameters' gradients are averaged over every rank,
the experts' gradients (which already hold their 'ep' group's tokens) summed over the ``dp`` replicas and divided by
the number of ranks, so that the training is that of the mean of every rank's loss.

The reference is one process with the whole layer that runs every rank's batch per step and backpropagates the mean
of their losses: the router figures (load, MaxVio, dead experts, margins), the gate shares, the losses, gradient
conflict (every scope: parameters, the E expert slices, "all"; purity), the per-expert conflict and the experts'
similarity must equal it (1e-5), with the router measured on each rank's own tokens before dispatch and summed
over ``ep``, the conflict statistics of each rank's experts put together over ``ep``, and the similarity probe rows
(rank 0's first rows, as in the replay's first forward of a step) sent to every expert's owner.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _distributed import launch_and_replay, same_table, train_on_mean
from _grouped_experts import GroupedMoE
from torch import nn

import gatewatch as gw
from gatewatch.quantities.conflict.read import expert_table
from gatewatch.report import build_report

pytestmark = pytest.mark.slow  # 2 and 4 processes

TASKS = ["a", "b"]
SIZES = {0: 10, 1: 14, 2: 12, 3: 8}
STEPS, EVERY, LR, EXPERTS = 3, 1, 0.1, 4
LAYOUTS = {"ep": {"ep": 2}, "dp_x_ep": {"dp": 2, "ep": 2}}  # mesh dimensions and their sizes
TABLES = ("gates", "shares", "routers", "router_experts", "losses", "conflict", "purity", "similarity",
          "similarity_summary")


def new_model() -> GroupedMoE:
    return GroupedMoE(n_layers=1, n_experts=EXPERTS).double()


class ExpertParallel(nn.Module):
    """This rank's ``E/ep`` experts (slices of the whole layer's ``[E, ...]`` parameters) and the all-to-all
    dispatch of its 'ep' group's (token, expert) pairs to the experts' owners."""

    def __init__(self, whole: nn.Module, rank: int, world: int, group: object) -> None:
        super().__init__()
        self.per_rank, self.world, self.rank, self.group = whole.w1.shape[0] // world, world, rank, group
        own = slice(rank * self.per_rank, (rank + 1) * self.per_rank)
        self.w1 = nn.Parameter(whole.w1.detach()[own].clone())
        self.w2 = nn.Parameter(whole.w2.detach()[own].clone())
        self.w3 = nn.Parameter(whole.w3.detach()[own].clone())

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_to_all_single

        token, slot = torch.where(indices >= 0)  # every (token, chosen expert) pair
        expert = indices[token, slot]
        order = torch.argsort(expert // self.per_rank, stable=True)  # grouped by owner rank
        token, slot, expert = token[order], slot[order], expert[order]
        send = torch.bincount(expert // self.per_rank, minlength=self.world)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        sends, recvs = send.tolist(), recv.tolist()
        got_expert = expert.new_empty(sum(recvs))
        dist.all_to_all_single(got_expert, expert, recvs, sends, group=self.group)
        got = all_to_all_single(x.new_empty(sum(recvs), x.shape[1]), x[token], recvs, sends, group=self.group)
        local = got_expert - self.rank * self.per_rank
        y = torch.zeros_like(got)
        for e in range(self.per_rank):
            rows = torch.where(local == e)[0]
            if len(rows):
                h = got[rows]
                y = y.index_add(0, rows, (F.silu(h @ self.w1[e].T) * (h @ self.w3[e].T)) @ self.w2[e].T)
        back = all_to_all_single(x.new_empty(len(token), x.shape[1]), y, sends, recvs, group=self.group)
        return torch.zeros_like(x).index_add(0, token, back * weights[token, slot, None])


def task_losses(model: nn.Module, step: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(SIZES[rank], 6, generator=g, dtype=torch.float64) + 0.5 * rank
    out = model(x)
    return {"a": F.mse_loss(out["a"], x[:, 0] - x[:, 1]), "b": F.mse_loss(out["b"], x[:, 2] * x[:, 3])}


def watch_for(model: nn.Module, log_dir: Path, mesh: object = None) -> gw.GateWatch:
    return gw.GateWatch(model, tasks=TASKS, log_dir=log_dir, every=EVERY, flush_every=EVERY, tensorboard=False,
                        mesh=mesh, conflict_every=1, similarity_every=1)


def worker(root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dims = LAYOUTS[(Path(root) / "layout").read_text()]
    world, rank = math.prod(dims.values()), int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", tuple(dims.values()), mesh_dim_names=tuple(dims))
        ep_group = mesh["ep"].get_group()
        model = new_model()
        layer = model.layers[0]
        layer.experts = ExpertParallel(layer.experts, mesh.get_local_rank("ep"), dims["ep"], ep_group)
        experts = set(layer.experts.parameters())
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        with watch_for(model, Path(root) / "run", mesh) as watch:
            for step in range(1, STEPS + 1):
                watch.backward(task_losses(model, step, rank))
                for p in model.parameters():  # the gradient of the mean of every rank's loss
                    if p not in experts:  # replicated: summed over every rank
                        dist.all_reduce(p.grad)
                    elif "dp" in dims:  # its 'ep' group's tokens are in it already: summed over the dp replicas
                        dist.all_reduce(p.grad, group=mesh["dp"].get_group())
                    p.grad.div_(world)
                opt.step()
                opt.zero_grad()
                watch.step()
        whole = {n: p.detach().clone() for n, p in model.named_parameters()}
        for name in ("w1", "w2", "w3"):
            parts = [torch.empty_like(whole[f"layers.0.experts.{name}"]) for _ in range(dims["ep"])]
            dist.all_gather(parts, whole[f"layers.0.experts.{name}"], group=ep_group)
            whole[f"layers.0.experts.{name}"] = torch.cat(parts)
        if rank == 0:
            torch.save(whole, Path(root) / "ep.pt")
    finally:
        dist.destroy_process_group()


def replay(log_dir: Path, world: int) -> dict[str, torch.Tensor]:
    """The same training in one process with the whole layer: every rank's batch, the mean of their losses."""
    model = new_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    return train_on_mean(model, watch_for(model, log_dir), opt, STEPS,
                         lambda step: [task_losses(model, step, r) for r in range(world)])


@pytest.fixture(scope="module", params=list(LAYOUTS))
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp(f"expert-parallel-{request.param}")
    (root / "layout").write_text(request.param)
    world = math.prod(LAYOUTS[request.param].values())
    return launch_and_replay("test_expert_parallel", root, lambda log_dir: replay(log_dir, world), world=world,
                             timeout=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("table", TABLES)
def test_ep_figures_equal_one_process_on_both_ranks_tokens(runs: Path, table: str) -> None:
    got, want = gw.load_run(runs / "run"), gw.load_run(runs / "replay")
    same_table(table, got.table(table), want.table(table))


@pytest.mark.timeout(300)
def test_ep_counts_both_ranks_tokens_and_trains_as_one_process(runs: Path) -> None:
    run = gw.load_run(runs / "run")
    world = math.prod(LAYOUTS[(runs / "layout").read_text()].values())
    assert run.status == "finished" and run.problems == [] and run.meta["world_size"] == world
    assert set(run.table("routers")["tokens"]) == {sum(SIZES[r] for r in range(world)) * EVERY}
    replayed = torch.load(runs / "replay.pt")
    for name, value in torch.load(runs / "ep.pt").items():
        torch.testing.assert_close(value, replayed[name], rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.timeout(300)
def test_per_expert_conflict_covers_every_expert_once_as_one_process(runs: Path) -> None:
    got, want = expert_table(gw.load_run(runs / "run")), expert_table(gw.load_run(runs / "replay"))
    same_table("expert_conflict", got, want)
    experts = [f"layers.0.experts[{i}]" for i in range(EXPERTS)]
    assert got.groupby("step")["module"].apply(sorted).tolist() == [experts] * STEPS  # one pair (a, b) per step
    meta = gw.load_run(runs / "run").meta
    assert meta["conflict"]["ep_ranks"] == 2 and meta["conflict"]["disabled"] is None
    assert meta["gates"][0]["fused_experts"] == {"module": "layers.0.experts", "experts": EXPERTS, "ep_ranks": 2,
                                                 "params": {f"layers.0.experts.{w}": 0 for w in ("w1", "w2", "w3")}}


@pytest.mark.timeout(300)
def test_nothing_is_skipped_under_ep(runs: Path) -> None:
    assert build_report(gw.load_run(runs / "run"))["skipped"] == []
