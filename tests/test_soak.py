"""Soak: two runs written while the dashboard's data layer reads them, over and over.

Two training processes (fresh interpreters) each train a tiny MMoE with a GateWatch of its own
(``every=1, flush_every=5, flush_secs=0.5``; a step every 25 ms at most, with a sleep in each, so a
flush lands every 0.1 to 0.3 s) for ``GATEWATCH_SOAK_S`` seconds (default 60). Writer ``a`` merges its files
after every 4 flushes (levelled: 4, 16, 64, ... flushes per chunk) instead of every 64, so that
merges, and merges of merges, happen under the reader all the time; writer ``b`` keeps the default.

Meanwhile this process reads both runs in a loop the way the dashboard does (``gatewatch.app.data``
without Streamlit's cache: discover the runs, check they lie inside the root, the change token, then
``load_run``, the findings, the Runs page's row and the report) and checks every read:

* nothing half-written: the only problems named are parts of a flush whose commit record was not
  there yet when the reader listed the commit records (the flush being written, or committed and
  merged away, at that moment: :func:`in_flight`); the final read must have no problem at all;
* no window is read twice in one read (rows unique per key in every table), and the windows of each
  table are 1, 2, ..., k: nothing skipped, nothing before the last window missing;
* a later read never has fewer windows, in any table, than an earlier one;
* the reader's memory stays flat: after each read, once the reader let go of what it no longer uses
  (``gc.collect``, glibc's ``malloc_trim``, Arrow's ``release_unused``), the peak over the last 75% of
  the reads exceeds the peak over the first 25% by less than a bound, both for the resident memory
  (``VmRSS``) and for the heap the reader actually holds (glibc's blocks in use plus Arrow's
  allocations); see :func:`memory_bounds` for the bounds and why.

Once both writers closed their watch, the final read holds every window each writer closed (it saves
its step count) exactly once, in every table.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

import gatewatch as gw
from gatewatch.app.state import change_token, check_inside, discover, run_row
from gatewatch.findings import Thresholds, find
from gatewatch.report import build_report

SOAK_S = float(os.environ.get("GATEWATCH_SOAK_S", "60"))
TASKS = ["ctr", "like"]
EXPERTS, BINS = 3, 5
WRITERS = {"a": 4, "b": 64}  # run name -> compact_every of its run-directory writer
STEP_PERIOD_S, MIN_SLEEP_S = 0.025, 0.005  # at most 40 steps (windows) a second, however fast the machine
KEYS = {"gates": ["step", "gate"], "shares": ["step", "gate", "expert"], "hist": ["step", "gate", "bin"],
        "experts": ["step", "expert"], "losses": ["step", "task"]}
WINDOW_TABLES = {"gates": "gate", "losses": "task"}  # tables with a row per window for each gate / task
# The problems a run may have while it is written (gatewatch.run_reader._uncommitted): a part of a flush whose commit
# record was not there yet when the reader listed the commit records. Either it is still there (the flush is being
# written), or it is gone by the time the reader looks at it (committed and merged into a chunk meanwhile; the
# error is then pyarrow's FileNotFoundError, whose text is the path or "... No such file or directory").
PART_PROBLEM = re.compile(r"^(?P<path>\S+/tables/\w+/part-\d{6,}\.parquet): (?P<why>.*); skipped$")
BEING_WRITTEN = "its flush has no commit record (cut short by a crash, or still being written)"
MERGED_MEANWHILE = ", and its flush has no commit record"


def in_flight(problem: str) -> bool:
    """Whether ``problem`` names a part of a flush that was being written (or merged) while the run was read."""
    m = PART_PROBLEM.match(problem)
    if m is None:
        return False
    why = m["why"]
    if why == BEING_WRITTEN:
        return True
    reason = why.removesuffix(MERGED_MEANWHILE)
    return reason != why and (reason == m["path"] or "No such file or directory" in reason)


def writer(log_dir: str, seconds: float, compact_every: int, result: str) -> None:
    """Train for ``seconds`` with a GateWatch on ``log_dir``; save the windows it closed to ``result``."""
    import torch
    from torch import nn

    from gatewatch.models import MMoE

    torch.set_num_threads(1)
    torch.manual_seed(compact_every)
    model = MMoE(in_dim=8, tasks=TASKS, n_experts=EXPERTS, expert_hidden=(8,), expert_dim=4, tower_hidden=(4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    bce = nn.functional.binary_cross_entropy_with_logits
    watch = gw.GateWatch(model, tasks=TASKS, log_dir=log_dir, every=1, flush_every=5, flush_secs=0.5,
                         tensorboard=False, bins=BINS)
    assert watch.writer is not None
    watch.writer.compact_every = compact_every
    flushes, flush = [0], watch.flush

    def counting_flush() -> None:
        flushes[0] += 1
        flush()

    watch.flush = counting_flush  # type: ignore[method-assign]
    deadline = time.monotonic() + seconds
    while (started := time.monotonic()) < deadline:
        x = torch.randn(32, 8)
        y = (x[:, 0] > 0).float()
        out = model(x)
        watch.backward({"ctr": bce(out[0], y), "like": bce(out[1], 1 - y)})
        opt.step()
        opt.zero_grad()
        watch.step()
        time.sleep(max(MIN_SLEEP_S, STEP_PERIOD_S - (time.monotonic() - started)))
    watch.close()
    steps = watch.step_count
    Path(result).write_text(json.dumps({"windows": list(range(1, steps + 1)), "flushes": flushes[0],
                                        "seq": watch.writer.seq, "write_failures": watch.writer.failures}))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc, or glibc older than 2.33
        return None


GLIBC = _glibc()


def memory_mb() -> tuple[float, float | None]:
    """The reader's resident memory (VmRSS) and the heap it holds (glibc's blocks in use, mmapped ones included,
    plus Arrow's allocations; None off glibc), in MiB, once it let go of what it no longer uses."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    heap = None
    if GLIBC is not None:
        GLIBC.malloc_trim(0)
        info = GLIBC.mallinfo2()
        heap = (info.uordblks + info.hblkhd + pa.total_allocated_bytes()) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024, heap
    raise AssertionError("no VmRSS in /proc/self/status")


def memory_bounds(held_mb: float) -> tuple[float, float]:
    """How much the reader's resident memory and its heap may grow (MiB), given the in-memory size of the final
    tables of both runs (``held_mb``; about 3 MiB after the default 60 s).

    Heap: at each sample the reader holds the two runs it has just read (at most ``held_mb``) and a few MiB of
    caches that fill once (pandas, pyarrow, the findings rules): 8 MiB + 2 x ``held_mb``. Measured on the shared
    2-core machine: +4 to +6 MiB over 60 s. A data layer that kept its reads (an unbounded cache, a leaked
    reference) would hold the sum of them, 50 MiB or more over the ~50 reads of 60 s, and fail.

    Resident memory also counts the pages the allocators keep once freed, above all Arrow's mimalloc pool: after
    60 s it had 100 MiB committed while Arrow's allocated bytes were back to ~0 (``print_stats``). What it keeps
    follows the largest read so far (the runs grow; the first reads of the merged files ``close()`` leaves are
    the largest), not the number of reads: +42 to +68 MiB over 60 s with 2.3 to 3.6 MiB of tables (up to +100
    MiB without ``malloc_trim``/``release_unused``), while the heap in use grew by 6 MiB at most. So: 32 MiB +
    20 x ``held_mb``. The heap bound is the sharp check against leaks; this one catches resident memory that
    keeps climbing anyway (an allocator that does not reuse what it keeps).
    """
    return 32 + 20 * held_mb, 8 + 2 * held_mb


def read_like_the_dashboard(root: Path) -> dict[str, gw.Run]:
    """Every run below ``root``, read as ``gatewatch.app.data`` reads it (minus Streamlit's cache)."""
    runs = {}
    thresholds = Thresholds()
    for ref in discover(root):
        check_inside(root, ref.path)
        change_token(ref.path)
        run = gw.load_run(ref.path)
        findings = find(run, thresholds)
        run_row(ref, run, findings)
        build_report(run, thresholds, findings)
        runs[ref.id] = run
    return runs


def windows_of(run: gw.Run) -> dict[str, int]:
    """Per table, the number of windows read; fails on a window read twice, or one missing before the last."""
    counts = {}
    for name, keys in KEYS.items():
        df = run.table(name)
        assert not df.duplicated(keys).any(), f"{run.path}: rows of {name} read twice"
        assert df["step"].is_monotonic_increasing, f"{run.path}: {name} out of step order"
        steps = sorted(set(df["step"]))
        assert steps == list(range(1, len(steps) + 1)), f"{run.path}: {name} skips windows ({steps[:3]}...)"
        counts[name] = len(steps)
    for name, column in WINDOW_TABLES.items():
        df = run.table(name)
        per = df.groupby(column)["step"].apply(list)
        assert all(v == list(range(1, len(v) + 1)) for v in per), f"{run.path}: {name} differs between {column}s"
    return counts


def start_writers(root: Path, out: Path) -> dict[str, subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, compact in WRITERS.items():
        code = (f"import test_soak; test_soak.writer({str(root / name)!r}, {SOAK_S}, {compact}, "
                f"{str(out / (name + '.json'))!r})")
        with open(out / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT)
    return procs


@pytest.mark.slow
@pytest.mark.timeout(int(2 * SOAK_S) + 120)
def test_runs_read_while_written_are_never_half_written_repeated_or_shrinking(tmp_path: Path) -> None:
    root, out = tmp_path / "runs", tmp_path / "out"
    root.mkdir()
    out.mkdir()
    procs = start_writers(root, out)
    last: dict[str, dict[str, int]] = {}
    rss: list[float] = []
    heap: list[float | None] = []
    reads, transient, live_reads = 0, set(), dict.fromkeys(WRITERS, 0)
    deadline = time.monotonic() + SOAK_S + 90
    try:
        while any(p.poll() is None for p in procs.values()):
            assert time.monotonic() < deadline, "the writers did not finish in time"
            failed = {n: p.returncode for n, p in procs.items() if p.poll()}
            assert not failed, f"writer failed: {failed}\n" + "\n".join((out / f"{n}.log").read_text() for n in failed)
            for name, run in read_like_the_dashboard(root).items():
                assert run.status in ("live", "finished"), (name, run.status)
                live_reads[name] += run.status == "live"
                odd = [p for p in run.problems if not in_flight(p)]
                assert not odd, f"{name}: {odd}"
                transient.update(run.problems)
                counts = windows_of(run)
                before = last.get(name, dict.fromkeys(KEYS, 0))
                assert all(counts[t] >= before[t] for t in KEYS), f"{name}: fewer windows than before {before} {counts}"
                last[name] = counts
                reads += 1
                resident, held = memory_mb()
                rss.append(resident)
                heap.append(held)
            time.sleep(0.05)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
    failed = {n: p.returncode for n, p in procs.items() if p.returncode}
    assert not failed, f"writer failed: {failed}\n" + "\n".join((out / f"{n}.log").read_text() for n in failed)

    # the reads happened while the runs were written, and saw them grow
    assert all(n >= 10 for n in live_reads.values()), live_reads
    final = read_like_the_dashboard(root)
    assert sorted(final) == sorted(WRITERS)
    for name, run in final.items():
        saved = json.loads((out / f"{name}.json").read_text())
        assert saved["write_failures"] == 0
        assert run.status == "finished" and run.problems == [], (name, run.problems)
        windows = saved["windows"]
        assert len(windows) > 100 and saved["flushes"] > 20, saved  # many windows, many flushes
        for table, keys in KEYS.items():  # every window each writer closed, exactly once
            df = run.table(table)
            assert not df.duplicated(keys).any(), (name, table)
            assert sorted(set(df["step"])) == windows, (name, table)
        for table, column in WINDOW_TABLES.items():
            df = run.table(table)
            assert len(df) == len(windows) * df[column].nunique() and df[column].nunique() == len(TASKS)
        assert len(run.shares) == len(windows) * len(TASKS) * EXPERTS
        assert len(run.hist) == len(windows) * len(TASKS) * BINS

    # reader memory: the peak after the first quarter of the reads against the peak during it (see memory_bounds)
    assert len(rss) >= 20, len(rss)
    quarter = len(rss) // 4
    held_mb = sum(df.memory_usage(deep=True).sum() for run in final.values() for df in run.tables.values()) / 2**20
    rss_bound, heap_bound = memory_bounds(held_mb)
    rss_growth = max(rss[quarter:]) - max(rss[:quarter])
    heaps = [h for h in heap if h is not None]
    heap_growth = max(heaps[quarter:]) - max(heaps[:quarter]) if len(heaps) == len(heap) else None
    sizes = {n: len(json.loads((out / f"{n}.json").read_text())["windows"]) for n in WRITERS}
    print(f"soak {SOAK_S:.0f} s: windows {sizes}, {reads} reads, {len(transient)} parts named in flight, final "
          f"tables {held_mb:.1f} MiB; RSS {max(rss[:quarter]):.1f} -> {max(rss[quarter:]):.1f} MiB (+{rss_growth:.1f}, "
          f"bound {rss_bound:.0f}), heap +{heap_growth if heap_growth is None else round(heap_growth, 1)} MiB (bound "
          f"{heap_bound:.0f})")
    if heap_growth is not None:
        assert heap_growth < heap_bound, f"the reader's heap grew by {heap_growth:.1f} MiB"
    assert rss_growth < rss_bound, f"the reader's RSS grew by {rss_growth:.1f} MiB (to {max(rss):.1f})"

def test_a_commit_chunk_merged_away_while_it_is_read_is_no_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the soak found: the reader lists ``_flushes/``, then a levelled merge replaces the chunk it is about
    to read with a wider one. The flushes still count as committed, and no file is named as unreadable."""
    import pyarrow.parquet as pq

    from gatewatch.run_format import FLUSHES, committed, merge_parquet, table_files
    from gatewatch.schema import RUN_FORMAT, frame
    from gatewatch.sinks.run_writer import RunDirWriter

    writer = RunDirWriter(tmp_path / "run", compact_every=2)
    writer.write_meta({"format": RUN_FORMAT, "name": "run", "status": "finished", "steps": 6})
    for step in range(1, 7):  # chunks 1-4 (a merge of merges) and 5-6
        writer.write({"losses": frame("losses", [{"step": step, "task": "a", "loss": 1.0}])})
    folder = tmp_path / "run" / "tables" / FLUSHES
    assert [f.name for f in table_files(folder)] == ["chunk-000001-000004.parquet", "chunk-000005-000006.parquet"]
    read_table, merged = pq.read_table, []

    def merge_first(source: object, *args: object, **kwargs: object) -> object:
        if not merged:  # the writer's next level of merging, between the reader's listing and its read
            files = table_files(folder)
            merge_parquet(files, folder / "chunk-000001-000006.parquet")
            for f in files:
                f.unlink()
            merged.append(True)
        return read_table(source, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", merge_first)
    problems: list[str] = []
    assert committed(tmp_path / "run" / "tables", problems) == set(range(1, 7))
    assert merged and problems == []
    monkeypatch.setattr(pq, "read_table", read_table)
    run = gw.load_run(tmp_path / "run")
    assert run.problems == [] and run.losses["step"].tolist() == list(range(1, 7))
