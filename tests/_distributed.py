"""Launch a test's worker function in fresh interpreters, one per rank, with the environment torchrun sets.

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
from pathlib import Path

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
