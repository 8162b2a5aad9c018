"""Pipeline parallelism (a ``DeviceMesh`` with one ``pp`` dimension, gloo processes on CPU) against a single-process
replay.

A small sparse MoE (float64, ``tests/_grouped_experts.py``'s layers): an input projection, two top-2 MoE layers
held in a ``ModuleDict`` (so that each stage keeps the full model's module paths, as torchtitan does), optionally a
dense block, and one head per task. Each stage keeps only its own modules and runs a manual pipeline: the forward
sends the activations to the next stage with ``dist.send``/``dist.recv``, the last stage computes the task losses
and backpropagates them through ``watch.backward``, and each earlier stage backpropagates the gradient of its output
that the next stage sent back.

* 2 stages: stage 0 holds the projection and ``layers.0``, stage 1 ``layers.1`` and the heads.
* 3 stages: stage 0 as above, stage 1 ``layers.1``, stage 2 a dense block and the heads (no gate, and the only
  stage with the losses).
* 2 x 2 (``dp`` x ``pp``, 4 processes): the 2 stages, each data-parallel group on its own batches (shifted data),
  the gradients averaged over ``dp``.

The reference is one process with the whole model on the same batches (under ``dp``: both batches, the mean of
their losses): every gate, router and loss figure of rank 0's run must equal it (1e-5), each layer once, and the
training must be the same.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _distributed import launch, launch_and_replay, same_table, train_on_mean
from _grouped_experts import MoELayer
from torch import nn

import gatewatch as gw
from gatewatch.capture.distributed import own_group
from gatewatch.capture.quantity import Quantity, Reduction
from gatewatch.capture.reducer import Reducer
from gatewatch.quantities.conflict.layout import ConflictError

pytestmark = pytest.mark.slow  # 2 and 3 processes

TASKS = ["a", "b"]
SIZE, STEPS, EVERY, LR = 16, 3, 1, 0.1
TABLES = ("gates", "shares", "routers", "router_experts", "losses")
GATES = ["layers.0.router", "layers.1.router"]


class PipelineMoE(nn.Module):
    """Projection, two MoE layers, an optional dense block, one head per task; ``stage_of`` says where each
    top-level part runs."""

    def __init__(self, dense: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 8)
        self.layers = nn.ModuleDict({str(i): MoELayer(8, 12, 4, 2) for i in range(2)})
        self.dense = nn.Sequential(nn.Linear(8, 8), nn.Tanh()) if dense else None
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in TASKS})

    def parts(self) -> list[nn.Module]:
        """The parts in forward order."""
        return [self.embed, self.layers["0"], self.layers["1"], *([self.dense] if self.dense is not None else [])]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for part in self.parts():
            x = part(x)
        return {t: head(x).squeeze(-1) for t, head in self.heads.items()}


def stages_of(dense: bool) -> list[list[str]]:
    """The parts each stage holds."""
    if dense:
        return [["embed", "layers.0"], ["layers.1"], ["dense", "heads"]]
    return [["embed", "layers.0"], ["layers.1", "heads"]]


LAYOUTS = {"two-stages": (1, 2), "dense-third-stage": (1, 3), "dp-x-pp": (2, 2)}  # (dp, pp)


def batch(step: int, dp_rank: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    x = torch.randn(SIZE, 6, generator=g, dtype=torch.float64) + 0.5 * dp_rank
    return x, {"a": x[:, 0] - x[:, 1], "b": x[:, 2] * x[:, 3]}


def losses_of(out: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {t: F.mse_loss(out[t], y[t]) for t in TASKS}


def keep_stage(model: PipelineMoE, held: list[str]) -> list[nn.Module]:
    """Delete every part this stage does not hold (paths stay those of the full model); its parts in order."""
    for name in ("0", "1"):
        if f"layers.{name}" not in held:
            del model.layers[name]
    for name in ("embed", "dense"):
        if name not in held:
            setattr(model, name, None)
    if "heads" not in held:
        model.heads = nn.ModuleDict()
    return [model.get_submodule(p) for p in held if p != "heads"]


def watch_for(model: nn.Module, log_dir: Path, mesh: object = None, **options: object) -> gw.GateWatch:
    return gw.GateWatch(model, tasks=TASKS, log_dir=log_dir, every=EVERY, flush_every=EVERY, tensorboard=False,
                        mesh=mesh, **options)


def pipeline_step(model: PipelineMoE, parts: list[nn.Module], watch: gw.GateWatch, step: int, dp_rank: int,
                  peers: list[int]) -> None:
    """One training step of this stage (``peers``: the global ranks of this pipeline's stages): forward (recv, run,
    send), backward (recv the gradient, run, send)."""
    stage = peers.index(dist.get_rank())
    x, y = batch(step, dp_rank)
    if stage == 0:
        h_in = x
    else:
        h_in = torch.empty(SIZE, 8, dtype=torch.float64)
        dist.recv(h_in, src=peers[stage - 1])
        h_in.requires_grad_(True)
    h = h_in
    for part in parts:
        h = part(h)
    if stage == len(peers) - 1:
        watch.backward(losses_of({t: head(h).squeeze(-1) for t, head in model.heads.items()}, y))
    else:
        dist.send(h.detach(), dst=peers[stage + 1])
        grad = torch.empty_like(h)
        dist.recv(grad, src=peers[stage + 1])
        h.backward(grad)
    if stage > 0:
        dist.send(h_in.grad, dst=peers[stage - 1])


def worker(root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    n_dp, n_pp = LAYOUTS[(Path(root) / "layout").read_text()]
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (n_dp, n_pp), mesh_dim_names=("dp", "pp"))
        dp_rank, stage = mesh.get_local_rank(0), mesh.get_local_rank(1)
        peers = dist.get_process_group_ranks(mesh["pp"].get_group())
        dense = n_pp == 3
        model = PipelineMoE(dense).double()
        parts = keep_stage(model, stages_of(dense)[stage])
        with pytest.raises(ConflictError, match=r"autograd\.grad cannot cross the send/recv"):
            watch_for(model, Path(root) / "refused", mesh, conflict_every=1)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        with watch_for(model, Path(root) / "run", mesh) as watch:
            for step in range(1, STEPS + 1):
                pipeline_step(model, parts, watch, step, dp_rank, peers)
                for p in model.parameters():  # data parallel: the mean of the dp groups' gradients
                    dist.all_reduce(p.grad, group=mesh["dp"].get_group())
                    p.grad.div_(n_dp)
                opt.step()
                opt.zero_grad()
                watch.step()
        if dp_rank == 0:
            torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, Path(root) / f"stage{stage}.pt")
    finally:
        dist.destroy_process_group()


def replay(log_dir: Path, n_dp: int, dense: bool) -> dict[str, torch.Tensor]:
    """The same training in one process with the whole model: every dp group's batch, the mean of their losses."""
    model = PipelineMoE(dense).double()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    return train_on_mean(model, watch_for(model, log_dir), opt, STEPS,
                         lambda step: [losses_of(model(x), y) for x, y in (batch(step, r) for r in range(n_dp))])


@pytest.fixture(scope="module", params=list(LAYOUTS))
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp(f"pipeline-{request.param}")
    (root / "layout").write_text(request.param)
    n_dp, n_pp = LAYOUTS[request.param]
    return launch_and_replay("test_pipeline_parallel", root, lambda log_dir: replay(log_dir, n_dp, dense=n_pp == 3),
                             world=n_dp * n_pp, timeout=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("table", TABLES)
def test_every_stage_s_layers_equal_the_replay(runs: Path, table: str) -> None:
    got, want = gw.load_run(runs / "run"), gw.load_run(runs / "replay")
    same_table(table, got.table(table), want.table(table))


@pytest.mark.timeout(300)
def test_each_layer_once_and_the_training_unchanged(runs: Path) -> None:
    run = gw.load_run(runs / "run")
    assert run.status == "finished" and run.problems == []
    assert [(g["name"], g["stage"], g["level"], g["experts"]) for g in run.meta["gates"]] == [
        (GATES[0], 0, 0, 4), (GATES[1], 1, 1, 4)]  # a dense stage adds no gate
    assert [r["gate"] for r in run.meta["routers"]] == GATES
    gates = run.table("gates")
    assert sorted(gates["gate"].unique()) == GATES and len(gates) == 2 * STEPS  # each layer once per window
    n_dp = LAYOUTS[(runs / "layout").read_text()][0]
    assert run.meta["world_size"] == n_dp * LAYOUTS[(runs / "layout").read_text()][1]
    assert set(run.table("routers")["tokens"]) == {n_dp * SIZE * EVERY}  # no stage adds zeros or counts twice
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["replay", "run"]  # only rank 0 wrote
    replayed = torch.load(runs / "replay.pt")
    stages = [torch.load(p) for p in sorted(runs.glob("stage*.pt"))]
    assert sorted(n for s in stages for n in s) == sorted(replayed)  # the stages hold the whole model once
    for state in stages:
        for name, value in state.items():
            torch.testing.assert_close(value, replayed[name], rtol=1e-9, atol=1e-11, msg=name)


class Held(Quantity):
    """A quantity that declares ``states`` and collects ``values`` as they are (one window)."""

    def __init__(self, name: str, states: dict[str, Reduction], values: dict[str, torch.Tensor]) -> None:
        self.name, self.values = name, values
        for key, kind in states.items():
            self.add_state(key, kind)

    def collect(self, windows: list[int]) -> dict[str, torch.Tensor]:
        return self.values


def rank_states(rank: int) -> list[Held]:
    """Rank 0 and rank 1 declare different states: some shared, some their own, a quantity rank 0 lacks."""
    v = float(rank + 1)
    if rank == 0:
        return [Held("a", {"x": Reduction.SUM, "y": Reduction.MIN, "r0": Reduction.REPLICATED},
                     {"x": torch.full((1, 3), v), "y": torch.tensor([[5.0]]), "r0": torch.tensor([7.0, 8.0])})]
    return [Held("a", {"x": Reduction.SUM, "z": Reduction.SUM, "m": Reduction.MAX, "r1": Reduction.REPLICATED},
                 {"x": torch.full((1, 3), v), "z": torch.tensor([[1.0, 2.0]]), "m": torch.tensor([[4.0]]),
                  "r1": torch.tensor([[9.0, -1.0, float("inf")]])}),
            Held("b", {"s": Reduction.SUM, "c": Reduction.CONCAT},
                 {"s": torch.tensor([[3.0]]), "c": torch.tensor([[1.0, 2.0], [3.0, 4.0]])})]


def reducer_worker(root: str) -> None:
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        reducer = Reducer(rank_states(rank), distributed=True, group=own_group(), varied=True)  # type: ignore[arg-type]
        host, control = reducer.reduce([1], [2.0 if rank == 0 else 0.0])
        if rank == 0:
            flat = {f"{q}/{k}": v for q, states in host.items() for k, v in states.items()}
            np.savez(Path(root) / "host.npz", control=np.asarray(control), **flat)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_the_reducer_gathers_states_that_differ_between_ranks(tmp_path: Path) -> None:
    launch("test_pipeline_parallel", "reducer_worker", tmp_path, world=2, timeout=90)
    got = dict(np.load(tmp_path / "host.npz"))
    want = {"control": [2.0], "a/x": [[3.0, 3.0, 3.0]], "a/y": [[5.0]], "a/z": [[1.0, 2.0]], "a/m": [[4.0]],
            "a/r0": [7.0, 8.0], "a/r1": [[9.0, -1.0, np.inf]], "b/s": [[3.0]], "b/c": [[1.0, 2.0], [3.0, 4.0]]}
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], np.asarray(value, dtype=float), err_msg=key)
