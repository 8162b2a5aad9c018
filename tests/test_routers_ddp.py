"""Sparse routers under torch.distributed: 2 gloo processes on tiny transformers MoE models (CPU).

Each rank trains the same model wrapped in DDP on its own tokens and records every router output with a
separate hook. The DeepSeek-V3 run updates the expert bias aux-loss-free from the load over both ranks
(``b += u * sign(mean load - load)``, the counts all-reduced), so the bias stays replicated. The test then
computes every router figure in numpy from both ranks' outputs, concatenated, and compares rank 0's run
directory with it: the dispatch load, MaxVio, dead experts, margins, affinity shares and ``bias_changed`` are
over both ranks' tokens, the logged bias is the replicated bias (not the sum over ranks), and the Switch
run's dropped tokens are summed over ranks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from _distributed import launch
from _hf_moe import batch, build
from test_hf_routers import MARGIN, reference  # the numpy figures of one router over one window
from torch.nn.parallel import DistributedDataParallel

import gatewatch as gw
from gatewatch.gating.discovery import resolve

pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # 2 processes (see `make test-fast`)

STEPS, EVERY, WORLD, UPDATE = 4, 2, 2, 1e-2
FAMILIES = ("deepseek_v3", "switch")


def tokens_of(step: int, rank: int) -> int:
    """The batch seed of ``rank`` at ``step``: every rank and step gets its own tokens."""
    return 100 * step + rank


def worker(root: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)  # MASTER_ADDR / MASTER_PORT from the launcher
    try:
        for family in FAMILIES:
            train(family, rank, Path(root))
    finally:
        dist.destroy_process_group()


def train(family: str, rank: int, root: Path) -> None:
    """Train ``family`` under DDP and GateWatch; save this rank's router outputs per window and the bias at
    each window's end."""
    model = build(family)
    routers = resolve(model, None, None)
    bias = family == "deepseek_v3"
    if bias:
        for g in routers:
            with torch.no_grad():
                g.module.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, g.module.num_experts))
    model.train()
    ddp = DistributedDataParallel(model, find_unused_parameters=True)  # tokens reach only some experts
    watch = gw.GateWatch(ddp, log_dir=root / f"{family}-rank{rank}", every=EVERY, tensorboard=False,
                         margin=MARGIN)
    current: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in routers]
    windows: list[list[list[tuple[torch.Tensor, ...]]]] = [[] for _ in routers]
    biases: list[list[torch.Tensor]] = [[] for _ in routers]
    for i, g in enumerate(routers):
        def grab(m: Any, _i: Any, out: Any, i: int = i) -> None:  # the output, and the bias it was chosen with
            b = getattr(m, "e_score_correction_bias", None)
            current[i].append((*(o.detach().clone() for o in out), torch.zeros(0) if b is None else b.clone()))
        g.module.register_forward_hook(grab)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for step in range(1, STEPS + 1):
        ddp(**batch(family, seed=tokens_of(step, rank))).loss.backward()
        opt.step()
        opt.zero_grad()
        if bias:  # DeepSeek-V3's aux-loss-free update, from the load over every rank: the bias stays replicated
            for i, g in enumerate(routers):
                n = g.module.num_experts
                load = torch.bincount(current[i][-1][2].reshape(-1), minlength=n).double()
                dist.all_reduce(load)
                with torch.no_grad():
                    g.module.e_score_correction_bias += UPDATE * torch.sign(load.mean() - load).float()
        watch.step()
        if step % EVERY == 0:
            for i, g in enumerate(routers):
                windows[i].append(current[i])
                b = getattr(g.module, "e_score_correction_bias", None)
                biases[i].append(torch.zeros(0) if b is None else b.detach().clone())
                current[i] = []
    watch.close()
    torch.save({"windows": windows, "bias": biases}, root / f"{family}-outputs-{rank}.pt")


def as_numpy(outs: list[tuple[torch.Tensor, ...]]) -> list[tuple[Any, ...]]:
    """The reference's layout: router outputs as tensors, the bias as a numpy array (None without one)."""
    return [(*o[:-1], o[-1].numpy() if o[-1].numel() else None) for o in outs]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("routers-ddp")
    launch("test_routers_ddp", "worker", root, world=WORLD, timeout=150)
    return root


def outputs(root: Path, family: str) -> list[dict[str, Any]]:
    return [torch.load(root / f"{family}-outputs-{rank}.pt") for rank in range(WORLD)]


def rows_of(run: gw.Run, table: str, gate: str, step: int) -> pd.DataFrame:
    df = run.table(table)
    return df[(df["gate"] == gate) & (df["step"] == step)].sort_values("expert" if "expert" in df else "gate")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("family", FAMILIES)
def test_router_figures_cover_both_ranks_tokens(ddp_runs: Path, family: str) -> None:
    run = gw.load_run(ddp_runs / f"{family}-rank0")
    assert not (ddp_runs / f"{family}-rank1").exists()
    assert run.meta["world_size"] == WORLD and run.status == "finished" and run.problems == []
    saved = outputs(ddp_runs, family)
    gates = resolve(build(family), None, None)
    assert len(gates) == len(saved[0]["windows"]) >= 1
    steps = sorted(run.table("routers")["step"].unique())
    assert steps == list(range(EVERY, STEPS + 1, EVERY))
    for i, g in enumerate(gates):
        for w, step in enumerate(steps):
            per_rank = [s["windows"][i][w] for s in saved]
            bias = None if g.router.bias is None else saved[0]["bias"][i][w].numpy()
            both = reference(g.module, g.router, as_numpy(per_rank[0] + per_rank[1]), bias)
            mine = reference(g.module, g.router, as_numpy(per_rank[0]), bias)
            row = rows_of(run, "routers", g.name, step).iloc[0]
            experts = rows_of(run, "router_experts", g.name, step)
            shares = rows_of(run, "shares", g.name, step)
            where = f"{family} {g.name} step {step}"
            assert row["tokens"] == both["tokens"] == 2 * mine["tokens"], where
            if g.router.mask is None:  # the load straight from both ranks' indices
                k = g.router.top_k
                idx = np.concatenate([o[2].reshape(-1, k).numpy() for o in per_rank[0] + per_rank[1]])
                load = np.bincount(idx.ravel(), minlength=len(experts)) / len(idx)
                np.testing.assert_allclose(experts["load"], load, atol=1e-12, err_msg=where)
            np.testing.assert_allclose(experts["load"], both["load"], atol=1e-12, err_msg=where)
            assert not np.allclose(experts["load"], mine["load"]), where  # rank 0's tokens alone differ
            for key in ("max_violation", "dead", "margin", "small_margin", "bias_changed", "dropped"):
                np.testing.assert_allclose(row[key], both[key], atol=1e-5, err_msg=f"{where} {key}")
            np.testing.assert_allclose(shares["share"], both["share"], atol=1e-5, err_msg=where)


@pytest.mark.timeout(180)
def test_deepseek_bias_is_replicated_not_summed(ddp_runs: Path) -> None:
    run = gw.load_run(ddp_runs / "deepseek_v3-rank0")
    saved = outputs(ddp_runs, "deepseek_v3")
    gates = resolve(build("deepseek_v3"), None, None)
    routers = run.table("routers")
    for i, g in enumerate(gates):
        for w, step in enumerate(sorted(routers["step"].unique())):
            bias = saved[0]["bias"][i][w].numpy()
            np.testing.assert_array_equal(bias, saved[1]["bias"][i][w].numpy())  # the same on both ranks
            logged = rows_of(run, "router_experts", g.name, step)["bias"].to_numpy()
            np.testing.assert_allclose(logged, bias, atol=1e-7)  # rank 0's copy, not 2x
            assert rows_of(run, "routers", g.name, step)["bias_max"].iloc[0] == pytest.approx(np.abs(bias).max())
        first, last = saved[0]["bias"][i][0].numpy(), saved[0]["bias"][i][-1].numpy()
        assert not np.allclose(first, last)  # the loop's update shows from window to window
    assert (routers["bias_changed"] > 0).all()  # the bias changes some tokens' choice on the two ranks together


@pytest.mark.timeout(180)
def test_switch_dropped_tokens_are_summed_over_ranks(ddp_runs: Path) -> None:
    run = gw.load_run(ddp_runs / "switch-rank0")
    saved = outputs(ddp_runs, "switch")
    routers, experts = run.table("routers"), run.table("router_experts")
    assert (routers["dropped"] > 0).any() and routers["bias_changed"].isna().all()
    for i, g in enumerate(resolve(build("switch"), None, None)):
        for w, step in enumerate(sorted(routers["step"].unique())):
            outs = [o for s in saved for o in s["windows"][i][w]]
            e = outs[0][0].shape[-1]
            kept = sum(o[0].reshape(-1, e).double().sum(0).numpy() for o in outs)
            chose = sum(np.bincount(o[2].reshape(-1, e).argmax(-1).numpy(), minlength=e) for o in outs)
            mine = experts[(experts["gate"] == g.name) & (experts["step"] == step)].sort_values("expert")
            with np.errstate(divide="ignore", invalid="ignore"):
                want = np.where(chose > 0, 1 - kept / chose, np.nan)
            np.testing.assert_allclose(mine["dropped"], want, atol=1e-12, err_msg=f"{g.name} {step}")
