"""Long runs stay bounded: flat host memory, a run directory that grows linearly, few files.

A shortened version of ``benchmarks/bench_long_run.py`` (which gives the 1,000,000-step figures in
docs/reliability.md): the same simulation through GateWatch's real hooks, with merges every 4
flushes so that the levelled merges of the run directory happen within the test.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a 6,000-step run with merges (about 25 s on 2 cores)

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_long_run.py"
STEPS, EVERY, FLUSH_EVERY, COMPACT_EVERY, WARM = 6_000, 10, 100, 4, 3_000  # 60 flushes, merges up to level 3


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_long_run", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[dict]:
    bench = bench_module()
    return bench.simulate(tmp_path_factory.mktemp("long") / "run", STEPS, every=EVERY, flush_every=FLUSH_EVERY,
                          batch=8, compact_every=COMPACT_EVERY)


@pytest.mark.timeout(900)
def test_host_memory_stays_flat(samples) -> None:
    run = [s for s in samples if s["phase"] == "run"]
    warm = next(s for s in run if s["step"] >= WARM)
    last = run[-1]
    assert last["heap"] - warm["heap"] < 256 * 1024  # Python objects: nothing kept per step or per flush
    assert last["rss"] - warm["rss"] < 32 * 2**20  # the process as a whole (allocator slack included)


def test_run_directory_grows_linearly_and_modestly(samples) -> None:
    run = {s["step"]: s for s in samples if s["phase"] == "run"}
    per_step = [run[s]["table_bytes"] / s for s in run if s >= WARM]
    assert max(per_step) < 1.6 * min(per_step)  # linear: bytes per step do not creep up
    closed = samples[-1]
    assert closed["table_bytes"] / STEPS * 1000 < 250_000  # 2 gates x 8 experts, a window every 10 steps: ~155 KB


def test_merges_keep_the_file_count_logarithmic(samples) -> None:
    flushes = STEPS // FLUSH_EVERY
    levels = math.ceil(math.log(flushes, COMPACT_EVERY))
    folders = 6  # gates, shares, hist, experts, losses, and the commit records
    most = max(s["table_files"] for s in samples if s["phase"] == "run")
    assert most <= folders * (COMPACT_EVERY - 1) * (levels + 1)
    assert samples[-1]["table_files"] == folders  # one file per table once closed
