"""Under torch.distributed no rank waits forever for gatewatch: 2 gloo processes where one rank stops early
(it closes its watch after fewer steps) or raises mid-run, while rank 0 trains on. Rank 0 must finish within
the flush and close timeouts plus a margin, warn naming the rank, keep every window it has, and mark the windows that
hold rank 0 alone with a ``ranks_partial`` event.

Two layouts: each rank trains its own copy of a small MMoE (no wrapper, so only gatewatch's collectives can hang,
and rank 1 leaves the training), or the model is sharded with FSDP2 (``fully_shard`` on each expert and on the
root), whose training needs both ranks: there rank 1's watch stops (closed early, or left by an exception) and
rank 1 trains on without it.

With gradient conflict on (applied scope, every ``EVERY`` steps), rank 0's conflict steps after rank 1 stopped
must not hang either: the average of the task gradients runs in gatewatch's own group, and under FSDP2 the extra
backward passes (which all-gather the experts' parameters in the training's group) run only when every rank's
watch measures the step. Conflict logging then turns off, naming rank 1, and keeps the steps both ranks measured.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _distributed import launch

import gatewatch as gw
from gatewatch.capture import distributed
from gatewatch.models import MMoE

pytestmark = pytest.mark.slow
STEPS, STOP_AT, EVERY, FLUSH_EVERY, BATCH = 12, 6, 2, 4, 8
CLOSE_TIMEOUT_S, FLUSH_TIMEOUT_S = 5.0, 10.0  # short, so that the test is quick


def worker(root: str) -> None:
    torch.set_num_threads(1)
    rank, scenario = int(os.environ["RANK"]), (Path(root) / "scenario").read_text()
    layout = (Path(root) / "layout").read_text()
    conflict = (Path(root) / "conflict").read_text() == "on"
    distributed.CLOSE_TIMEOUT_S, distributed.FLUSH_TIMEOUT_S = CLOSE_TIMEOUT_S, FLUSH_TIMEOUT_S
    dist.init_process_group("gloo", rank=rank, world_size=2)  # MASTER_ADDR / MASTER_PORT from the launcher
    torch.manual_seed(0)
    model = MMoE(in_dim=6, n_experts=3, expert_hidden=(), expert_dim=4, tasks=["a", "b"])
    if layout == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for expert in model.experts:
            fully_shard(expert)
        fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trained = 0
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with gw.GateWatch(model, tasks=["a", "b"], log_dir=Path(root) / "run", every=EVERY,
                              flush_every=FLUSH_EVERY, tensorboard=False,
                              conflict_every=EVERY if conflict else 0) as watch:
                for step in range(1, STEPS + 1):
                    if rank == 1 and step > STOP_AT:
                        if scenario == "raises":
                            raise RuntimeError("rank 1 fails mid-run")
                        break
                    x = torch.randn(BATCH, 6)
                    out = model(x)
                    watch.backward({"a": out[0].pow(2).mean(), "b": out[1].abs().mean()})
                    opt.step()
                    opt.zero_grad()
                    watch.step()
                    trained = step
        except RuntimeError as err:
            if "fails mid-run" not in str(err):
                raise
        if layout == "fsdp2":  # the sharded training needs every rank: rank 1 trains on without its watch
            for _ in range(trained + 1, STEPS + 1):
                out = model(torch.randn(BATCH, 6))
                (out[0].pow(2).mean() + out[1].abs().mean()).backward()
                opt.step()
                opt.zero_grad()
    report = {"seconds": time.monotonic() - started, "warnings": [str(w.message) for w in caught]}
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(report))
    os._exit(0)  # no destroy_process_group: the other rank may be gone


def results(root: Path, scenario: str, layout: str, conflict: str) -> dict[int, dict]:
    """Run the scenario on 2 ranks; what each rank saw (its time to finish, its warnings)."""
    (root / "scenario").write_text(scenario)
    (root / "layout").write_text(layout)
    (root / "conflict").write_text(conflict)
    launch("test_ddp_failures", "worker", root, world=2, timeout=120)
    return {rank: json.loads((root / f"rank{rank}.json").read_text()) for rank in range(2)}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("conflict", ["off", "on"])
@pytest.mark.parametrize("layout", ["own copies", "fsdp2"])
@pytest.mark.parametrize("scenario", ["stops early", "raises"])
def test_a_rank_that_stops_early_or_raises_never_hangs_rank_0(tmp_path: Path, scenario: str, layout: str,
                                                              conflict: str) -> None:
    seen = results(tmp_path, scenario, layout, conflict)
    waits = 2 if conflict == "on" else 1  # the conflict collective's timeout, then the flush's
    assert seen[0]["seconds"] < waits * FLUSH_TIMEOUT_S + CLOSE_TIMEOUT_S + 20, seen[0]
    assert any("rank 1 stopped answering" in w for w in seen[0]["warnings"]), seen[0]["warnings"]
    assert any("rank(s) 0 did not reach close()" in w for w in seen[1]["warnings"]), seen[1]["warnings"]
    run = gw.load_run(tmp_path / "run")
    assert run.status == "finished" and run.steps == STEPS
    partial = run.events[run.events["kind"] == "ranks_partial"]
    assert len(partial) == 1, run.events
    alone_from = int(partial["step"].iloc[0])
    assert STOP_AT < alone_from <= STEPS
    samples = run.gates.groupby("step")["samples"].first()
    assert list(samples.index) == list(range(EVERY, STEPS + 1, EVERY))  # every window is kept
    assert (samples[samples.index <= STOP_AT] == 2 * BATCH * EVERY).all()  # both ranks
    assert (samples[samples.index >= alone_from] == BATCH * EVERY).all()  # rank 0 alone
    if conflict == "on":
        assert any("rank 1 stopped answering gatewatch's conflict collective" in w for w in seen[0]["warnings"]), (
            seen[0]["warnings"])
        assert "stopped answering" in run.meta["conflict"]["disabled"]
        measured = sorted(set(run.table("conflict")["step"]))
        assert measured == list(range(EVERY, STOP_AT + 1, EVERY))  # the steps both ranks measured, none after
