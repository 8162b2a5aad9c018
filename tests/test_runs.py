"""Run directories: sink -> load_run round trips, runs cut off mid-write, live runs, TensorBoard events."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
from conftest import tiny_mmoe, train

import gatewatch as gw
from gatewatch.schema import TABLES, frame
from gatewatch.sinks.run_writer import RunDirWriter, table_files

TASKS = ["ctr", "like"]


def gate_rows(step: int, nonfinite_at: int | None = None) -> pd.DataFrame:
    rows = [
        {"step": step, "gate": g, "task": g, "level": 0, "experts": 4, "samples": 64.0, "entropy": 0.1 * step,
         "drift": math.nan if step == 1 else 0.01, "first_nonfinite_step": nonfinite_at}
        for g in TASKS
    ]
    return frame("gates", rows)


def flush_tables(step: int) -> dict[str, pd.DataFrame]:
    return {
        "gates": gate_rows(step, 3 if step >= 3 else None),
        "losses": frame("losses", [{"step": step, "task": t, "loss": 1.0 / step} for t in TASKS]),
        "events": frame("events"),
    }


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def rewrite_meta(path, **fields) -> None:
    meta = json.loads((path / "run.json").read_text())
    meta.update(fields)
    (path / "run.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------- round trips
def test_sink_to_load_run_round_trip(tmp_path) -> None:
    writer = RunDirWriter(tmp_path, compact_every=3)
    written = [flush_tables(step) for step in range(1, 6)]
    for tables in written:
        assert writer.write(tables)
    writer.write_meta({"format": "gatewatch-run/1", "status": "finished", "tasks": TASKS, "steps": 5})
    names = sorted(f.name for f in (tmp_path / "tables" / "gates").iterdir())
    assert names == ["chunk-000001-000003.parquet", "part-000004.parquet", "part-000005.parquet"]
    run = gw.load_run(tmp_path)
    assert run.status == "finished" and run.problems == [] and run.steps == 5 and run.tasks == TASKS
    for name in ("gates", "losses"):
        expected = pd.concat([t[name] for t in written], ignore_index=True)
        pd.testing.assert_frame_equal(run.table(name), expected)
    assert list(run.hist.columns) == list(TABLES["hist"]) and len(run.hist) == 0  # never written: empty, typed
    assert run.gates["first_nonfinite_step"].dtype == "Int64"


@pytest.mark.slow
def test_close_compacts_into_one_chunk_per_table(tmp_path) -> None:
    model = tiny_mmoe()
    with gw.GateWatch(model, tasks=TASKS, log_dir=tmp_path, every=5, flush_every=10, tensorboard=False) as watch:
        train(model, watch, 30, n=16)
        watch.writes.drain()  # the flush of step 30 is written by the writer thread
        mid = {name: gw.load_run(tmp_path).table(name) for name in TABLES}
    run = gw.load_run(tmp_path)
    for name in ("gates", "shares", "hist", "experts", "losses"):
        assert [f.name for f in table_files(tmp_path / "tables" / name)] == ["chunk-000001-000003.parquet"]
        pd.testing.assert_frame_equal(run.table(name), mid[name])  # 30 is a flush step: close adds nothing
    assert run.meta["gates"][0] | {"module_class": None} == {
        "name": "ctr", "task": "ctr", "level": 0, "path": "gates.ctr.2", "output": "probs", "experts": 4,
        "expert_names": ["0", "1", "2", "3"], "top_k": None, "module_class": None,
        "expert_modules": ["experts.0", "experts.1", "experts.2", "experts.3"],
        "expert_map": "inferred: children of experts", "scoring": None, "fused_experts": None,
    }


def test_a_chunk_covered_by_a_larger_chunk_is_not_read_twice(tmp_path) -> None:
    """A crash after writing a merged chunk but before deleting the smaller one duplicates nothing."""
    writer = RunDirWriter(tmp_path, compact_every=2)
    for step in range(1, 5):
        writer.write(flush_tables(step))  # chunk-1-2, chunk-3-4
    folder = tmp_path / "tables" / "gates"
    old = {f.name: f.read_bytes() for f in folder.iterdir()}
    writer.compact()  # chunk-1-4; the two small chunks are removed ...
    for name, data in old.items():  # ... unless the process died first
        (folder / name).write_bytes(data)
    assert [f.name for f in table_files(folder)] == ["chunk-000001-000004.parquet"]
    assert gw.load_run(tmp_path).gates["step"].tolist() == [1, 1, 2, 2, 3, 3, 4, 4]


# ---------------------------------------------------------------- partial runs
@pytest.fixture(scope="module")
def mid_run_snapshot(tmp_path_factory):
    """A copy of a run directory taken while its GateWatch was still running (250 steps, flushes at 100, 200),
    made once for the module (this process wrote it, so it reads as live while the tests run)."""
    model = tiny_mmoe()
    live = tmp_path_factory.mktemp("mid_run") / "live"
    with gw.GateWatch(model, tasks=TASKS, log_dir=live, every=10, flush_every=100, tensorboard=False) as watch:
        train(model, watch, 250, n=8)
        shutil.copytree(live, live.with_name("snapshot"))
    return live.with_name("snapshot")


@pytest.fixture
def mid_run(mid_run_snapshot, tmp_path):
    """A fresh copy of :func:`mid_run_snapshot` for one test to change."""
    return shutil.copytree(mid_run_snapshot, tmp_path / "copy")


@pytest.mark.slow
def test_load_run_of_a_live_run(mid_run) -> None:
    run = gw.load_run(mid_run)
    assert run.status == "live" and run.meta["pid"] == os.getpid()
    assert run.steps == 200 and run.gates["step"].max() == 200 and len(run.gates) == 2 * 20


@pytest.mark.slow
def test_run_cut_off_mid_write_reads_up_to_the_last_complete_flush(mid_run) -> None:
    before = {name: gw.load_run(mid_run).table(name) for name in TABLES}
    for name in ("gates", "shares"):
        folder = mid_run / "tables" / name
        data = (folder / "part-000002.parquet").read_bytes()
        (folder / "part-000003.parquet").write_bytes(data[: len(data) // 2])  # torn write
        (folder / ".part-000004.parquet.tmp-999").write_bytes(data)  # never renamed into place
    rewrite_meta(mid_run, status="running", pid=dead_pid())
    run = gw.load_run(mid_run)
    assert run.status == "cut off" and run.steps == 200
    for name in TABLES:
        pd.testing.assert_frame_equal(run.table(name), before[name])
    assert len(run.problems) == 2 and all("part-000003.parquet: not a readable Parquet file" in p for p in run.problems)
    report = gw.build_report(run)
    assert report["status"] == "cut off" and len(report["problems"]) == 2


@pytest.mark.slow
def test_status_of_a_run_on_another_host_goes_by_its_heartbeat(mid_run) -> None:
    rewrite_meta(mid_run, host=socket.gethostname() + "-elsewhere", heartbeat=time.time(), flush_secs=5.0,
                 step_time=0.3)
    assert gw.load_run(mid_run).status == "live"
    rewrite_meta(mid_run, heartbeat=time.time() - 14)  # within the grace: 3 x max(flush_secs, step time), >= 15 s
    assert gw.load_run(mid_run).status == "live"
    rewrite_meta(mid_run, heartbeat=time.time() - 16)
    assert gw.load_run(mid_run).status == "cut off"
    rewrite_meta(mid_run, heartbeat=time.time() - 100, step_time=60.0)  # a slow step (a long evaluation) is no crash
    assert gw.load_run(mid_run).status == "live"


def test_status_of_an_older_run_on_another_host_goes_by_its_last_update(mid_run) -> None:
    meta = json.loads((mid_run / "run.json").read_text())
    for key in ("heartbeat", "flush_secs", "step_time"):
        meta.pop(key, None)
    (mid_run / "run.json").write_text(json.dumps(meta))
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    rewrite_meta(mid_run, host=socket.gethostname() + "-elsewhere", updated=now)
    assert gw.load_run(mid_run).status == "live"
    rewrite_meta(mid_run, updated="2020-01-01T00:00:00+0000")
    assert gw.load_run(mid_run).status == "cut off"


def test_a_reused_pid_does_not_make_a_crashed_run_live(mid_run) -> None:
    rewrite_meta(mid_run, status="running", pid=os.getpid(), pid_start=-1.0, heartbeat=time.time() - 3600)
    assert gw.load_run(mid_run).status == "cut off"  # this pid is alive, but it is another process
    rewrite_meta(mid_run, pid_start=None)
    assert gw.load_run(mid_run).status == "live"


def test_corrupt_metadata_and_foreign_files_are_named_not_fatal(mid_run) -> None:
    (mid_run / "run.json").write_text("{not json")
    (mid_run / "tables" / "gates" / "part-000009.parquet").write_text("hello")
    pd.DataFrame({"step": [1], "user": ["x"]}).to_parquet(mid_run / "tables" / "gates" / "part-000010.parquet")
    run = gw.load_run(mid_run)
    assert run.status == "cut off" and run.gates["step"].max() == 200
    assert len(run.problems) == 3
    assert "run.json: unreadable" in run.problems[0]
    assert any("not a gatewatch 'gates' table" in p for p in run.problems)


def test_not_a_run(tmp_path) -> None:
    with pytest.raises(gw.RunReadError, match=r"neither run\.json nor tables/"):
        gw.load_run(tmp_path)
    with pytest.raises(gw.RunReadError, match="is not a folder"):
        gw.load_run(tmp_path / "missing")


def test_list_runs_finds_nested_runs(tmp_path) -> None:
    for name in ("b/run2", "a", ".hidden/run"):
        RunDirWriter(tmp_path / name).write_meta({"status": "finished"})
    assert [p.relative_to(tmp_path).as_posix() for p in gw.list_runs(tmp_path)] == ["a", "b/run2"]


# ---------------------------------------------------------------- TensorBoard
def test_tensorboard_events_read_back_with_stock_tensorboard(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = tiny_mmoe()
    with gw.GateWatch(model, tasks=TASKS, log_dir=tmp_path, every=5, flush_every=10) as watch:
        train(model, watch, 20, n=16)
    run = gw.load_run(tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("gate/ctr/entropy", "gate/like/polarization", "gate/ctr/share/3", "expert/3/utilization",
                "experts/load_cv", "loss/ctr"):
        assert tag in tags["scalars"], tag
    assert {"gate/ctr/weights", "gate/like/weights"} <= set(tags["histograms"])
    entropy = [(e.step, e.value) for e in events.Scalars("gate/ctr/entropy")]
    ctr = run.gates[run.gates["gate"] == "ctr"]
    assert [s for s, _ in entropy] == [5, 10, 15, 20]
    assert [v for _, v in entropy] == pytest.approx(ctr["entropy"].tolist(), rel=1e-6)
    util = [e.value for e in events.Scalars("expert/3/utilization")]
    assert util == pytest.approx(run.experts[run.experts["expert"] == "3"]["utilization"].tolist(), rel=1e-6)
    hist = events.Histograms("gate/ctr/weights")[-1].histogram_value
    assert hist.num == 16 * 5 * 4  # samples x experts in the window
    rows = run.table("hist")
    rows = rows[(rows["gate"] == "ctr") & (rows["step"] == 20)]
    assert list(hist.bucket_limit) == pytest.approx(rows["hi"].tolist())
    assert list(hist.bucket) == rows["count"].tolist()  # the run directory's bins, as they are
    assert "gate/ctr/drift" in tags["scalars"] and len(events.Scalars("gate/ctr/drift")) == 3  # NaN first: skipped
