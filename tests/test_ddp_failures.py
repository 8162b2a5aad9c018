"""Under torch.distributed no rank waits forever for gatewatch: 2 gloo processes where one rank stops early
(it closes its watch after fewer steps) or raises mid-run, while rank 0 trains on. Each rank trains its own
copy of a small MMoE (no DDP wrapper, so only gatewatch's collectives can hang). Rank 0 must finish within
the flush and close timeouts plus a margin, warn naming the rank, keep every window it has, and mark the windows that
hold rank 0 alone with a ``ranks_partial`` event.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_ddp import free_port

import gatewatch as gw
from gatewatch.capture import distributed
from gatewatch.models import MMoE

pytestmark = pytest.mark.slow
STEPS, STOP_AT, EVERY, FLUSH_EVERY, BATCH = 12, 6, 2, 4, 8
CLOSE_TIMEOUT_S, FLUSH_TIMEOUT_S = 5.0, 10.0  # short, so that the test is quick


def worker(rank: int, port: int, root: str, scenario: str) -> None:
    torch.set_num_threads(1)
    distributed.CLOSE_TIMEOUT_S, distributed.FLUSH_TIMEOUT_S = CLOSE_TIMEOUT_S, FLUSH_TIMEOUT_S
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = MMoE(in_dim=6, n_experts=3, expert_hidden=(), expert_dim=4, tasks=["a", "b"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with gw.GateWatch(model, tasks=["a", "b"], log_dir=Path(root) / "run", every=EVERY,
                              flush_every=FLUSH_EVERY, tensorboard=False) as watch:
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
        except RuntimeError as err:
            if "fails mid-run" not in str(err):
                raise
    report = {"seconds": time.monotonic() - started, "warnings": [str(w.message) for w in caught]}
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(report))
    os._exit(0)  # no destroy_process_group: the other rank may be gone


def launch(root: Path, scenario: str) -> dict[int, dict]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    procs, logs = [], [root / f"worker-{rank}.log" for rank in range(2)]
    for rank, log in enumerate(logs):
        with open(log, "w") as out:
            code = f"import test_ddp_failures as t; t.worker({rank}, {port}, {str(root)!r}, {scenario!r})"
            procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
        codes = [proc.wait(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert codes == [0, 0], "\n".join(log.read_text() for log in logs)
    return {rank: json.loads((root / f"rank{rank}.json").read_text()) for rank in range(2)}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("scenario", ["stops early", "raises"])
def test_a_rank_that_stops_early_or_raises_never_hangs_rank_0(tmp_path: Path, scenario: str) -> None:
    results = launch(tmp_path, scenario)
    assert results[0]["seconds"] < FLUSH_TIMEOUT_S + CLOSE_TIMEOUT_S + 20, results[0]
    assert any("rank 1 stopped answering" in w for w in results[0]["warnings"]), results[0]["warnings"]
    assert any("rank(s) 0 did not reach close()" in w for w in results[1]["warnings"]), results[1]["warnings"]
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
