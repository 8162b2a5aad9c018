"""The writer thread: every flush is written off the training thread, in order, bounded, and never at the cost of
training (gatewatch.sinks.background, docs/reliability.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from conftest import batch, task_losses, tiny_mmoe, train

import gatewatch as gw
from gatewatch.sinks import Sink

TASKS = ["ctr", "like"]
TESTS = Path(__file__).parent


def watch_for(model: torch.nn.Module, log_dir: Path, **kwargs: Any) -> gw.GateWatch:
    options = {"tasks": TASKS, "every": 1, "flush_every": 1, "flush_secs": None, "tensorboard": False, **kwargs}
    return gw.GateWatch(model, log_dir=log_dir, **options)


class Recording(Sink):
    """Records every call, in order; each write takes ``delay`` seconds (a slow tracker)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[tuple[str, Any]] = []

    def write(self, tables: dict[str, pd.DataFrame]) -> bool:
        time.sleep(self.delay)
        steps = sorted(set(tables["gates"]["step"])) if "gates" in tables and len(tables["gates"]) else []
        self.calls.append(("write", (steps, tables["eval"].copy() if "eval" in tables else None)))
        return True

    def write_meta(self, meta: dict[str, Any]) -> bool:
        self.calls.append(("meta", dict(meta)))
        return True

    def windows(self) -> list[int]:
        return [s for kind, value in self.calls if kind == "write" for s in value[0]]


def one_step(model: torch.nn.Module, watch: gw.GateWatch, i: int) -> None:
    x, y = batch(i, n=8)
    watch.backward(task_losses(model(x), y, TASKS))
    watch.step()


@pytest.mark.slow
def test_windows_reach_a_slow_sink_and_the_run_directory_in_order(tmp_path: Path) -> None:
    model, sink = tiny_mmoe(), Recording(delay=0.02)
    with watch_for(model, tmp_path / "run", flush_every=2, sinks=[sink]) as watch:
        train(model, watch, 15, n=8)
    assert sink.windows() == list(range(1, 16))
    run = gw.load_run(tmp_path / "run")
    assert run.problems == [] and sorted(set(run.gates["step"])) == list(range(1, 16))
    assert run.meta["writes"]["background"] and run.meta["writes"]["flushes"] == 8


@pytest.mark.slow
def test_at_most_one_flush_is_in_flight_and_the_waits_are_recorded(tmp_path: Path) -> None:
    model, sink = tiny_mmoe(), Recording(delay=0.1)
    watch = watch_for(model, tmp_path / "run", sinks=[sink])
    behind = []
    for i in range(8):
        one_step(model, watch, i)
        behind.append(watch.step_count - len(sink.windows()))  # flushes handed over, not yet written
    watch.close()
    assert max(behind) <= 1  # a flush waits for the last one: the rows held are those of one flush
    assert sink.windows() == list(range(1, 9))
    writes = gw.load_run(tmp_path / "run").meta["writes"]
    assert writes["waits"] >= 5 and writes["waits"] == watch.writes.waits  # the sink is slower than a step
    assert writes["waited_s"] >= 0.05 * writes["waits"] and writes["longest_wait_s"] <= 1.0
    assert 0 < writes["writing_cpu_s"] < writes["writing_s"] / 2  # the sink sleeps: wall clock, not CPU


def poison_at(model: torch.nn.Module, watch: gw.GateWatch, step: int) -> None:
    def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if watch.step_count + 1 == step:
            output = output.clone()
            output[0, 0] = float("inf")
            return output
        return None

    model.gates["ctr"][2].register_forward_hook(hook, prepend=True)


def test_on_nonfinite_raise_still_stops_at_the_flush_of_its_step(tmp_path: Path) -> None:
    model = tiny_mmoe()
    watch = watch_for(model, tmp_path / "run", flush_every=3, on_nonfinite="raise")
    poison_at(model, watch, 4)
    with pytest.raises(gw.NonFiniteGateError, match="first at step 4"):
        train(model, watch, 10, n=8)
    assert watch.step_count == 6  # the flush after steps 4..6
    watch.close()
    run = gw.load_run(tmp_path / "run")
    gate_events = run.events[(run.events["kind"] == "nonfinite") & (run.events["source"] == "ctr")]
    assert sorted(set(run.gates["step"])) == list(range(1, 7)) and gate_events["step"].tolist() == [4]


def test_nonfinite_warn_comes_on_the_training_thread_at_a_later_call(tmp_path: Path) -> None:
    model = tiny_mmoe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with watch_for(model, tmp_path / "run", flush_every=3) as watch:
            poison_at(model, watch, 4)
            for i in range(10):  # forward passes only: the NaN stays in the gate's rows
                model(batch(i, n=8)[0])
                watch.step()
    assert [str(w.message) for w in caught if "NaN/Inf" in str(w.message)] == [
        "gatewatch: gate 'ctr' produced NaN/Inf weights first at step 4; those samples are left out of its "
        "statistics."]


def guarded_run(path: Path, background: bool) -> tuple[list[list[str]], pd.DataFrame]:
    model = tiny_mmoe()
    model.force_gate("ctr", [12.0, 0.0, 0.0, 0.0])  # polarized: the guard acts at the first flush
    guard = gw.Guard(rules=("polarization",), dropout=0.5, revert_after=2)
    watch = gw.GateWatch(model, tasks=TASKS, log_dir=path, tensorboard=False, every=2, flush_every=2, guard=guard,
                         write_in_background=background)
    active = []
    for i in range(8):
        x, y = batch(i, 32, 12)
        watch.backward(task_losses(model(x), y, TASKS))
        watch.step()
        active.append(list(watch.guard.active))
    watch.close()
    return active, gw.load_run(path).table("events")


@pytest.mark.slow
def test_the_guard_decides_at_the_flush_step_as_without_the_writer_thread(tmp_path: Path) -> None:
    """docs/guard.md: while the guard is on, the rows are made on the training thread and the guard applies its
    dropout at the flush itself; only the writes move to the writer thread."""
    active, events = guarded_run(tmp_path / "bg", background=True)
    assert active[:2] == [[], ["ctr"]] and active[5] == []  # applied at step 2, removed after 2 windows
    same_active, same_events = guarded_run(tmp_path / "fg", background=False)
    assert active == same_active
    pd.testing.assert_frame_equal(events, same_events)


class Failing(Recording):
    """Raises on the writes of the first ``fail`` flushes."""

    def __init__(self, fail: int) -> None:
        super().__init__()
        self.fail = fail

    def write(self, tables: dict[str, pd.DataFrame]) -> bool:
        if self.fail > 0:
            self.fail -= 1
            raise ConnectionError("tracker down")
        return super().write(tables)


@pytest.mark.slow
def test_a_raising_sink_or_rows_is_a_warning_at_the_next_step_and_later_windows_are_kept(tmp_path: Path,
                                                                                         monkeypatch) -> None:
    model, sink = tiny_mmoe(), Failing(fail=3)
    watch = watch_for(model, tmp_path / "run", sinks=[sink])
    stats = watch.quantity("gates")
    real_rows, broken = stats.rows, {"at": 7}

    def rows(windows: list[int], host: dict) -> Any:
        if windows == [broken["at"]]:
            raise ValueError("a bug in a quantity")
        return real_rows(windows, host)

    monkeypatch.setattr(stats, "rows", rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(12):
            if i == 7:
                watch.writes.drain()  # the flush of step 7 failed on the writer thread ...
                assert not [w for w in caught if "a bug in a quantity" in str(w.message)]
                one_step(model, watch, i)  # ... and the next step warns it
                assert [w.filename for w in caught if "a bug in a quantity" in str(w.message)] == [__file__]
            else:
                one_step(model, watch, i)
        watch.close()
    messages = [str(w.message) for w in caught]
    assert sum("the sink Failing raised ConnectionError: tracker down" in m for m in messages) == 1
    assert sum("Failing works again" in m for m in messages) == 1
    assert sum("could not write the flush of steps 7..7: ValueError: a bug in a quantity" in m for m in messages) == 1
    assert sink.windows() == [s for s in range(1, 13) if s != 7]  # the failed flushes given again, in order
    run = gw.load_run(tmp_path / "run")
    assert sorted(set(run.gates["step"])) == [s for s in range(1, 13) if s != 7] and run.status == "finished"


@pytest.mark.slow
def test_close_with_a_stuck_sink_returns_within_its_timeout_and_names_what_was_not_written(tmp_path: Path) -> None:
    release = threading.Event()

    class Stuck(Sink):
        def write(self, tables: dict[str, pd.DataFrame]) -> bool:
            if len(tables["gates"]) and tables["gates"]["step"].max() >= 3:
                release.wait(60)  # a tracker that never answers
            return True

    model = tiny_mmoe()
    watch = watch_for(model, tmp_path / "run", sinks=[Stuck()])
    try:
        train(model, watch, 3, n=8)
        start = time.monotonic()
        with pytest.warns(RuntimeWarning, match=r"within 1 s; not written: the flush of steps 3\.\.3 \(still being "
                                                r"written\); .*the close of the sinks and the final run.json"):
            watch.close(timeout=1.0)
        assert time.monotonic() - start < 5
    finally:
        release.set()
    run = gw.load_run(tmp_path / "run")  # the run directory got the flush before the stuck sink was called
    assert sorted(set(run.gates["step"])) == [1, 2, 3] and run.meta["status"] == "running"


@pytest.mark.slow
def test_the_heartbeat_and_the_commit_come_before_a_slow_sink(tmp_path: Path) -> None:
    seen = []

    class Slow(Sink):
        def write(self, tables: dict[str, pd.DataFrame]) -> bool:
            if len(tables["gates"]):
                meta = json.loads((tmp_path / "run" / "run.json").read_text())
                seen.append((int(tables["gates"]["step"].max()), meta["steps"], time.time() - meta["heartbeat"]))
                time.sleep(0.2)
            return True

    model = tiny_mmoe()
    with watch_for(model, tmp_path / "run", sinks=[Slow()]) as watch:
        train(model, watch, 4, n=8)
    assert [(step, steps) for step, steps, _ in seen] == [(s, s) for s in range(1, 5)]
    assert all(age < 0.2 for *_, age in seen)


def test_log_metrics_and_annotate_arrive_in_order(tmp_path: Path) -> None:
    model, sink = tiny_mmoe(), Recording(delay=0.01)
    with watch_for(model, tmp_path / "run", flush_every=2, sinks=[sink]) as watch:
        for i in range(6):
            one_step(model, watch, i)
            watch.log_metrics(watch.step_count, {"ctr": {"auc": i / 10}})
            watch.annotate(phase=i)
    order = []
    for kind, value in sink.calls:
        if kind == "write":
            steps, evals = value
            order += [("window", s) for s in steps]
            order += [("eval", int(s)) for s in evals["step"]] if evals is not None and len(evals) else []
        else:
            order.append(("meta", value.get("phase")))
    windows_and_evals = [o for o in order if o[0] != "meta"]
    assert [o for o in windows_and_evals if o[0] == "eval"] == [("eval", s) for s in range(1, 7)]
    for s in (2, 4, 6):  # the flush of step s was handed over before the metrics logged after it
        assert windows_and_evals.index(("window", s)) < windows_and_evals.index(("eval", s))
    phases = [p for kind, p in order if kind == "meta" and p is not None]
    assert phases == sorted(phases) and phases[-1] == 5
    run = gw.load_run(tmp_path / "run")
    assert run.table("eval")["value"].tolist() == pytest.approx([i / 10 for i in range(6)])
    assert run.meta["phase"] == 5


class Numbers(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch(i, n=1)
        return x[0], y[0]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_forking_dataloader_with_two_workers(tmp_path: Path) -> None:
    model, sink = tiny_mmoe(), Recording(delay=0.05)  # slow writes: workers are forked while a flush is written
    loader = torch.utils.data.DataLoader(Numbers(), batch_size=8, num_workers=2, multiprocessing_context="fork")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch_for(model, tmp_path / "run", sinks=[sink]) as watch:
        for _epoch in range(3):  # new workers every epoch
            for x, y in loader:
                watch.backward(task_losses(model(x), y, TASKS))
                opt.step()
                opt.zero_grad()
                watch.step()
    assert sink.windows() == list(range(1, 25))
    run = gw.load_run(tmp_path / "run")
    assert run.status == "finished" and sorted(set(run.gates["step"])) == list(range(1, 25))


CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
import torch
from conftest import batch, task_losses, tiny_mmoe
import gatewatch as gw
from gatewatch import run_format
real = run_format.pq.write_table

def slow(table, where, *args, **kwargs):  # each Parquet file takes 20 ms: a kill lands inside a flush's writes
    time.sleep(0.02)
    return real(table, where, *args, **kwargs)

run_format.pq.write_table = slow
model = tiny_mmoe()
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
watch = gw.GateWatch(model, tasks=model.tasks, log_dir=sys.argv[1], every=1, flush_every=2, tensorboard=False)
step = 0
while True:
    x, y = batch(step, n=16)
    watch.backward(task_losses(model(x), y, model.tasks))
    opt.step()
    opt.zero_grad()
    watch.step()
    step += 1
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_while_the_writer_thread_writes_leaves_a_readable_run(tmp_path: Path) -> None:
    path = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(TESTS)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        gates = path / "tables" / "gates"
        while not (gates.is_dir() and len(os.listdir(gates)) >= 6):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the training process did not get going"
            time.sleep(0.005)
        time.sleep(0.03)  # inside the next flush's 20 ms writes
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run = gw.load_run(path)
    assert run.status == "cut off"
    assert all("no commit record" in p for p in run.problems), run.problems
    last = int(run.gates["step"].max())
    assert sorted(set(run.gates["step"])) == list(range(1, last + 1)) and last >= 8
    for name in ("shares", "losses"):
        assert sorted(set(run.table(name)["step"])) == list(range(1, last + 1))
    assert run.meta["steps"] <= last


def test_write_in_background_false_writes_on_the_training_thread(tmp_path: Path) -> None:
    class Broken(Sink):
        def write(self, tables: dict[str, pd.DataFrame]) -> bool:
            raise ConnectionError("raised where it happens")

    model = tiny_mmoe()
    watch = watch_for(model, tmp_path / "run", sinks=[Broken()], write_in_background=False)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(ConnectionError, match="raised where it happens"):
        train(model, watch, 1, n=8)
    assert not any(name.startswith("gatewatch-writer") for name in {t.name for t in threading.enumerate()} - before)
    with pytest.raises(ConnectionError):  # the last flush, at close
        watch.close()
    assert gw.load_run(tmp_path / "run").meta["writes"]["background"] is False
