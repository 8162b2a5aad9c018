"""Sample groups under torch.distributed: 2 gloo processes train a tiny Qwen3-MoE in DDP, each on its own tokens
and labels, and record every router output with a hook of the test's own. Rank 0's run must hold what one process
computes in numpy over both ranks' batches: tokens, share and load per group, and the specialisation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _distributed import launch
from _hf_moe import build
from test_groups import GROUPS, check_routing, np_softmax, per_token_labels
from torch.nn.parallel import DistributedDataParallel

import gatewatch as gw
from gatewatch.gating.discovery import resolve

pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # 2 processes

STEPS, EVERY, WORLD, B, S = 4, 2, 2, 3, 6


def worker(root: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        train(rank, Path(root))
    finally:
        dist.destroy_process_group()


def train(rank: int, root: Path) -> None:
    model = build("qwen3_moe")
    routers = resolve(model, None, None)
    model.train()
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    watch = gw.GateWatch(ddp, log_dir=root / f"rank{rank}", every=EVERY, tensorboard=False, sample_groups=GROUPS)
    seen: list[list[Any]] = [[] for _ in routers]
    now: dict[str, np.ndarray] = {}
    for i, g in enumerate(routers):
        def grab(_m: Any, _i: Any, out: Any, i: int = i) -> None:
            logits, _, idx = out
            seen[i].append((logits.detach().reshape(-1, logits.shape[-1]).numpy().copy(),
                            idx.detach().reshape(-1, idx.shape[-1]).numpy().copy(), now["labels"]))
        g.module.register_forward_hook(grab)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for step in range(1, STEPS + 1):
        seed = 100 * step + rank  # every rank and step its own tokens and labels
        ids = torch.randint(0, 64, (B, S), generator=torch.Generator().manual_seed(seed))
        labels = per_token_labels(B, S, seed, per_sequence=False)
        now["labels"] = labels.reshape(-1).numpy()
        with watch.grouped(labels):
            loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        watch.step()
    watch.close()
    torch.save(seen, root / f"outputs-{rank}.pt")


@pytest.mark.timeout(180)
def test_groups_over_both_ranks_equal_one_process(tmp_path: Path) -> None:
    launch("test_groups_ddp", "worker", tmp_path, world=WORLD, timeout=150)
    run = gw.load_run(tmp_path / "rank0")
    assert not (tmp_path / "rank1").exists() and run.problems == []
    saved = [torch.load(tmp_path / f"outputs-{r}.pt", weights_only=False) for r in range(WORLD)]
    gates = resolve(build("qwen3_moe"), None, None)
    for i, gate in enumerate(gates):
        for w in range(STEPS // EVERY):
            outs = [o for rank in saved for o in rank[i][w * EVERY:(w + 1) * EVERY]]  # one pass per step
            logits = np.concatenate([o[0] for o in outs]).astype(float)
            idx = np.concatenate([o[1] for o in outs])
            labels = np.concatenate([o[2] for o in outs])
            check_routing(run, gate.name, (w + 1) * EVERY, np_softmax(logits), labels, idx)
            alone = saved[0][i][w * EVERY:(w + 1) * EVERY]
            rows = run.table("group_routing")
            assert rows[(rows["gate"] == gate.name) & (rows["step"] == (w + 1) * EVERY)]["tokens"].sum() > \
                sum((o[2] >= 0).sum() for o in alone)  # more than rank 0's own rows
