"""Gradient conflict of the applied gradients under DDP and FSDP2: 2 gloo processes against a single-process replay.

Each rank trains the same small MMoE (float64) on its own batches, of different sizes (12 and 20 samples) and
shifted data, wrapped in DDP or sharded with FSDP2 (``fully_shard`` on each expert and on the root; once more on a
``("dp_replicate", "dp_shard")`` mesh handed to the watch as ``mesh=``), three times:
without a watch, with ``conflict_scope="applied"`` (the default) and with ``conflict_scope="local"``.

The reference is one process that replays the same training: per step it runs both ranks' batches through the
model and backpropagates the rank-averaged task losses ``L_k = mean_r loss_k^r`` (what DDP's and FSDP's gradient
averaging apply). Its gate statistics pool both ranks' tokens; its conflict is that of the gradients of ``L_k``. For
``"local"`` the replay measures conflict on rank 0's batch alone (rank 1's half of the gradient is accumulated
first), with the same weights. Training must be unchanged by the watch.

Under DDP two more trainings accumulate two micro-batches (each rank's batch in halves) per step: one with every
micro-batch synced (the first micro-batch's last task then comes from DDP's averaged ``.grad``, the second's by its
own ``autograd.grad``), one with the first inside ``no_sync()``. Their reference replays both micro-batches of each
step as two backward passes of the rank-averaged losses. Each training counts its ``torch.autograd.grad`` calls: the
applied scope under DDP takes K-1 per step when ``.grad`` is empty and the backward syncs.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _distributed import launch, same_table
from torch import nn

import gatewatch as gw
from gatewatch.models import MMoE
from gatewatch.quantities.conflict.read import scope_caption
from gatewatch.report import build_report

pytestmark = pytest.mark.slow  # 2 processes

TASKS = ["a", "b"]
SIZES = {0: 12, 1: 20}  # per-rank batch sizes
WORLD, STEPS, EVERY, LR = 2, 4, 2, 0.2
MODES = ("ddp", "fsdp2", "hsdp")  # hsdp: FSDP2 on a ("dp_replicate", "dp_shard") mesh of 1 x 2, given as mesh=
CONFIGS = ("plain", "applied", "local")
ACCUMULATING = ("accumulate", "no_sync")  # DDP only: two micro-batches per step, the first synced or not


def new_model() -> MMoE:
    torch.manual_seed(0)
    return MMoE(in_dim=6, tasks=TASKS, n_experts=3, expert_hidden=(8,), expert_dim=4, tower_hidden=(4,)).double()


def data(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(SIZES[rank], 6, generator=g, dtype=torch.float64) + 0.7 * rank  # the ranks' data differ
    return x, torch.stack([x[:, 0] - x[:, 1], x[:, 2] * x[:, 3]], 1)


def task_losses(model: nn.Module, step: int, rank: int, half: int | None = None) -> dict[str, torch.Tensor]:
    x, y = data(step, rank)
    if half is not None:  # a micro-batch: the first or second half of the rank's batch
        cut = len(x) // 2
        x, y = (x[:cut], y[:cut]) if half == 0 else (x[cut:], y[cut:])
    out = model(x)
    return {t: nn.functional.mse_loss(out[i].reshape(-1), y[:, i]) for i, t in enumerate(TASKS)}


def watch_for(model: nn.Module, log_dir: Path, scope: str, proxy: bool = True, mesh: object = None) -> gw.GateWatch:
    return gw.GateWatch(model, tasks=TASKS, log_dir=log_dir, every=EVERY, flush_every=EVERY, tensorboard=False,
                        conflict_every=1, conflict_scope=scope, conflict_proxy=proxy, mesh=mesh)


def hybrid_mesh() -> object:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp_replicate", "dp_shard"))


def wrap(model: MMoE, mode: str, mesh: object = None) -> nn.Module:
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for expert in model.experts:
        fully_shard(expert, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, whole (FSDP2's shards gathered)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def counting_grad() -> dict[str, int]:
    """Count the calls of ``torch.autograd.grad`` from now on (``calls["n"]``)."""
    calls, grad = {"n": 0}, torch.autograd.grad

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return grad(*args, **kwargs)

    torch.autograd.grad = counted
    return calls


def worker(root: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    calls, counts = counting_grad(), {}
    try:
        for mode in MODES:
            for config in CONFIGS + (ACCUMULATING if mode == "ddp" else ()):
                model = new_model()
                mesh = hybrid_mesh() if mode == "hsdp" else None
                wrapped = wrap(model, mode, mesh)
                opt = torch.optim.SGD(wrapped.parameters(), lr=LR)
                scope = "applied" if config in ACCUMULATING else config
                watch = None if config == "plain" else watch_for(wrapped, Path(root) / f"{mode}-{config}", scope,
                                                                 proxy=config not in ACCUMULATING, mesh=mesh)
                calls["n"] = 0
                for step in range(1, STEPS + 1):
                    if config in ACCUMULATING:
                        for half in (0, 1):
                            synced = config == "accumulate" or half == 1
                            with nullcontext() if synced else wrapped.no_sync():
                                assert watch is not None
                                watch.backward(task_losses(wrapped, step, rank, half))
                    elif watch is None:
                        sum(task_losses(wrapped, step, rank).values()).backward()
                    else:
                        watch.backward(task_losses(wrapped, step, rank))
                    opt.step()
                    opt.zero_grad()
                    if watch is not None:
                        watch.step()
                if watch is not None:
                    watch.close()
                counts[f"{mode}-{config}"] = calls["n"]
                state = full_state(model)
                if rank == 0:
                    torch.save(state, Path(root) / f"{mode}-{config}.pt")
        if rank == 0:
            (Path(root) / "autograd_grad_calls.json").write_text(json.dumps(counts))
    finally:
        dist.destroy_process_group()


def replay(log_dir: Path, scope: str) -> dict[str, torch.Tensor]:
    """The same training in one process; conflict of the rank-averaged losses (``applied``) or of rank 0's batch
    alone (``local``, where rank 1's half of the gradient is accumulated before the measured backward);
    ``accumulate``: the rank-averaged losses of each step's two micro-batches, one backward each."""
    model = new_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with watch_for(model, log_dir, "applied" if scope == "accumulate" else scope, proxy=scope == "applied") as watch:
        for step in range(1, STEPS + 1):
            if scope == "accumulate":
                for half in (0, 1):
                    per_rank = [task_losses(model, step, r, half) for r in range(WORLD)]
                    watch.backward({t: sum(p[t] for p in per_rank) / WORLD for t in TASKS})
            elif scope == "applied":
                per_rank = [task_losses(model, step, r) for r in range(WORLD)]
                watch.backward({t: sum(p[t] for p in per_rank) / WORLD for t in TASKS})
            else:
                (sum(task_losses(model, step, 1).values()) / WORLD).backward()
                with watch.task_gradients(task_losses(model, step, 0)) as total:
                    (total / WORLD).backward()
            opt.step()
            opt.zero_grad()
            watch.step()
    return full_state(model)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sharded")
    launch("test_sharded", "worker", root, world=WORLD, timeout=240)
    for scope in ("applied", "local", "accumulate"):
        torch.save(replay(root / f"replay-{scope}", scope), root / f"replay-{scope}.pt")
    return root


TABLES = ("gates", "shares", "losses", "conflict", "purity", "conflict_proxy")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("table", TABLES)
def test_applied_scope_equals_the_replay(runs: Path, mode: str, table: str) -> None:
    got, want = gw.load_run(runs / f"{mode}-applied"), gw.load_run(runs / "replay-applied")
    same_table(table, got.table(table), want.table(table))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", MODES)
def test_local_scope_is_rank_0_batch_alone(runs: Path, mode: str) -> None:
    got, want = gw.load_run(runs / f"{mode}-local"), gw.load_run(runs / "replay-local")
    for table in ("conflict", "purity"):
        same_table(table, got.table(table), want.table(table))
    applied = gw.load_run(runs / f"{mode}-applied").table("conflict")
    local = got.table("conflict")
    assert not np.allclose(applied["cosine"], local["cosine"])  # the two scopes describe different gradients


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", MODES)
def test_scope_is_recorded_and_only_rank_0_writes(runs: Path, mode: str) -> None:
    for scope in ("applied", "local"):
        run = gw.load_run(runs / f"{mode}-{scope}")
        assert run.status == "finished" and run.problems == [] and run.meta["world_size"] == WORLD
        assert run.meta["conflict"]["scope"] == scope and run.meta["conflict"]["disabled"] is None
        assert run.meta["conflict_proxy"]["scope"] == scope
        assert set(run.table("conflict")["step"]) == set(range(1, STEPS + 1))
        report = build_report(run)
        assert {c["scope"] for c in report["conflict"]} == {scope}
        assert {e["scope"] for e in report["expert_conflict"]} == {scope}
        assert scope_caption(run).startswith(f"Conflict scope: {scope},")  # the Conflict page's line
    assert sorted(p.name for p in runs.iterdir() if p.is_dir() and p.name.startswith(mode)) == sorted(
        [f"{mode}-applied", f"{mode}-local", *(f"{mode}-{c}" for c in ACCUMULATING if mode == "ddp")])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", MODES)
def test_training_is_unchanged_by_the_watch(runs: Path, mode: str) -> None:
    plain = torch.load(runs / f"{mode}-plain.pt")
    replayed = torch.load(runs / "replay-applied.pt")
    for config in ("applied", "local"):
        state = torch.load(runs / f"{mode}-{config}.pt")
        for name, value in plain.items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=f"{config} {name}")
    for name, value in plain.items():
        torch.testing.assert_close(replayed[name], value, rtol=1e-10, atol=1e-12, msg=name)  # the replay is exact


@pytest.mark.timeout(300)
@pytest.mark.parametrize("config", ACCUMULATING)
def test_accumulated_micro_batches_equal_the_replay(runs: Path, config: str) -> None:
    got, want = gw.load_run(runs / f"ddp-{config}"), gw.load_run(runs / "replay-accumulate")
    for table in ("gates", "losses", "conflict", "purity"):
        same_table(table, got.table(table), want.table(table))
    replayed = torch.load(runs / "replay-accumulate.pt")
    for name, value in torch.load(runs / f"ddp-{config}.pt").items():
        torch.testing.assert_close(value, replayed[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.timeout(300)
def test_applied_scope_under_ddp_takes_k_minus_1_backward_passes(runs: Path) -> None:
    """K = 2 tasks, a conflict step every step; the first step finds the shared parameters (one pass per task)."""
    calls = json.loads((runs / "autograd_grad_calls.json").read_text())
    k, later = len(TASKS), STEPS - 1
    assert calls["ddp-plain"] == 0
    assert calls["ddp-applied"] == k + later * (k - 1)  # DDP's averaged .grad gives the last task
    sharded = [calls[f"{mode}-{scope}"] for mode in ("fsdp2", "hsdp") for scope in ("applied", "local")]
    assert calls["ddp-local"] == k + later * k and set(sharded) == {k + later * k}
    # accumulate: the first micro-batch syncs with .grad empty (k - 1), the second finds .grad filled (k)
    assert calls["ddp-accumulate"] == 2 * k + later * (2 * k - 1)
    assert calls["ddp-no_sync"] == 2 * k + later * 2 * k  # inside no_sync() .grad is this rank's own
    assert gw.load_run(runs / "ddp-applied").meta["conflict"]["method"].startswith(
        "K-1 autograd.grad + subtraction from DDP's averaged .grad")
