"""Context parallelism on a real DeviceMesh: 2 gloo processes on a ``("dp", "cp")`` mesh of 1 x 2, against a
single-process replay.

Each sample is a sequence of tokens; 'cp' rank r holds the r-th half of every sequence (as context parallelism
splits the sequence dimension). The model is the torchtitan-style sparse MoE of ``_grouped_experts``, which routes
each token by itself, so the two halves together are the whole batch. The ranks average their gradients over 'cp'
(what the training's data-parallel reduction over ``dp`` and ``cp`` does), and the watch is given the mesh: the
router, gate and loss statistics add up over 'cp', and the applied-scope conflict is that of the mean of the two
halves' losses. The replay trains one process on the whole sequences, with the same mean of the halves' losses.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _distributed import launch_and_replay, same_table, train_on_mean
from _grouped_experts import GroupedMoE

import gatewatch as gw

pytestmark = pytest.mark.slow  # 2 processes

WORLD, STEPS, EVERY, LR, SEQUENCES, LENGTH = 2, 4, 2, 0.05, 6, 8
TABLES = ("gates", "routers", "router_experts", "losses", "conflict")


def half_losses(model: GroupedMoE, step: int, half: int) -> dict[str, torch.Tensor]:
    """Each task's mean squared error on the ``half``-th half of every sequence of the batch of ``step``."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(SEQUENCES, LENGTH, model.embed.in_features, generator=g)
    x = x[:, half * LENGTH // 2 : (half + 1) * LENGTH // 2].reshape(-1, x.shape[-1])
    y = {"a": x[:, 0] + x[:, 1], "b": x[:, 2] * x[:, 0] - x[:, 1]}
    out = model(x)
    return {t: F.mse_loss(out[t], y[t]) for t in model.tasks}


def watch_for(model: GroupedMoE, log_dir: Path, mesh: object = None) -> gw.GateWatch:
    return gw.GateWatch(model, log_dir=log_dir, tasks=model.tasks, every=EVERY, flush_every=EVERY,
                        tensorboard=False, conflict_every=1, similarity_every=0, mesh=mesh)


def worker(root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "cp"))
        half, group = mesh.get_local_rank(1), mesh["cp"].get_group()
        model = GroupedMoE()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        with watch_for(model, Path(root) / "run", mesh) as watch:
            for step in range(1, STEPS + 1):
                watch.backward(half_losses(model, step, half))
                for p in model.parameters():  # the mean over 'cp' of the halves' gradients
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad, group=group)
                    p.grad.div_(WORLD)
                opt.step()
                opt.zero_grad()
                watch.step()
        if rank == 0:
            torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, Path(root) / "mesh.pt")
    finally:
        dist.destroy_process_group()


def replay(log_dir: Path) -> dict[str, torch.Tensor]:
    """One process, whole sequences: at each step the backward of the mean of the two halves' losses."""
    model = GroupedMoE()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    return train_on_mean(model, watch_for(model, log_dir), opt, STEPS,
                         lambda step: [half_losses(model, step, half) for half in range(WORLD)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return launch_and_replay("test_context_parallel", tmp_path_factory.mktemp("cp"), replay, world=WORLD,
                             timeout=150)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("table", TABLES)
def test_statistics_over_cp_equal_the_whole_sequences(runs: Path, table: str) -> None:
    got, want = gw.load_run(runs / "run"), gw.load_run(runs / "replay")
    same_table(table, got.table(table), want.table(table))


@pytest.mark.timeout(200)
def test_every_token_is_counted_once_and_training_is_unchanged(runs: Path) -> None:
    run = gw.load_run(runs / "run")
    assert run.status == "finished" and run.problems == [] and run.meta["world_size"] == WORLD
    routers = run.table("routers")
    assert set(routers["tokens"]) == {SEQUENCES * LENGTH * EVERY}  # both halves of every sequence, once
    mesh, replayed = torch.load(runs / "mesh.pt"), torch.load(runs / "replay.pt")
    for name, value in replayed.items():
        torch.testing.assert_close(mesh[name], value, rtol=1e-5, atol=1e-6, msg=name)
