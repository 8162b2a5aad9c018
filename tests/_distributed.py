"""Launch a test's worker function in fresh interpreters, one per rank, with the environment torchrun sets; replay
the same training in one process; compare the two runs' tables.

Each rank runs ``import <module>; <module>.<function>(root)`` with ``tests/`` on ``PYTHONPATH`` and
``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set, so that frameworks which
find those variables (Lightning, Accelerate / the Hugging Face Trainer) take the processes as already
launched and only join the process group. Fresh interpreters do not depend on this process's ``__main__``
(which spawn-based launchers re-run in the children). A rank that fails ends the others at once, rather
than leaving them waiting in a collective.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

TESTS = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(module: str, function: str, root: Path, *, world: int = 2, timeout: float = 120.0) -> None:
    """Run ``module.function(str(root))`` on ``world`` ranks; fail with every rank's output if one fails."""
    port = free_port()
    base = {
        **os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    code = f"import {module}; {module}.{function}({str(root)!r})"
    logs = [root / f"worker-{rank}.log" for rank in range(world)]
    procs = []
    for rank, log in enumerate(logs):
        env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        with open(log, "w") as out:
            procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() for p in procs):  # one rank failed: the others would wait for it forever
                break
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    timed_out = time.monotonic() >= deadline
    failed = [f"rank {rank} exited with {proc.returncode}:\n{logs[rank].read_text()[-6000:]}"
              for rank, proc in enumerate(procs) if proc.returncode]
    assert not failed, (f"timed out after {timeout} s\n" if timed_out else "") + "\n".join(failed)


def launch_and_replay(module: str, root: Path, replay: Callable[[Path], dict[str, torch.Tensor]], *, world: int,
                      timeout: float) -> Path:
    """Run ``module.worker`` on ``world`` ranks (its run in ``root``), then ``replay(root / "replay")`` in this
    process, whose parameters are saved as ``root / "replay.pt"``."""
    launch(module, "worker", root, world=world, timeout=timeout)
    torch.save(replay(root / "replay"), root / "replay.pt")
    return root


def train_on_mean(model: torch.nn.Module, watch: object, opt: torch.optim.Optimizer, steps: int,
                  losses_at: Callable[[int], list[dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Train ``model`` in one process as the ranks do together: at each step the backward of the mean over the
    ranks of each task's loss (``losses_at(step)``: one dict of task losses per rank). Returns the parameters."""
    with watch:  # type: ignore[attr-defined]
        for step in range(1, steps + 1):
            per_rank = losses_at(step)
            watch.backward({t: sum(losses[t] for losses in per_rank) / len(per_rank)  # type: ignore[attr-defined]
                            for t in per_rank[0]})
            opt.step()
            opt.zero_grad()
            watch.step()  # type: ignore[attr-defined]
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_table(name: str, got: pd.DataFrame, want: pd.DataFrame) -> None:
    """The two tables hold the same rows (in any order): keys equal, floats within 1e-5."""
    keys = [c for c in want.columns if not pd.api.types.is_float_dtype(want[c])]
    got, want = got.sort_values(keys).reset_index(drop=True), want.sort_values(keys).reset_index(drop=True)
    assert len(got) == len(want) > 0, name
    assert list(got.columns) == list(want.columns), name
    for col in want.columns:
        if pd.api.types.is_float_dtype(want[col]):
            np.testing.assert_allclose(got[col].to_numpy(float), want[col].to_numpy(float), rtol=1e-5, atol=1e-6,
                                       equal_nan=True, err_msg=f"{name}.{col}")
        else:
            assert got[col].astype(str).tolist() == want[col].astype(str).tolist(), f"{name}.{col}"
