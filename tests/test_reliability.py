"""Reliability: nothing lost on a crash, no crash on bad input, nothing unsafe loaded (docs/reliability.md).

Every test here runs a real GateWatch on a tiny model (``conftest.tiny_mmoe``) and reads what it wrote
back with ``load_run``; failures are real files, real signals, or the write calls of the run
directory replaced for a few flushes (disk full, permission denied: the tests may run as root, where
``chmod`` blocks nothing).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import batch, task_losses, tiny_mmoe, train
from torch import nn

import gatewatch as gw
from gatewatch import cli, run_format
from gatewatch.sinks.run_writer import RunDirWriter
from gatewatch.sinks.tensorboard import TensorBoardSink

TASKS = ["ctr", "like"]
TESTS = Path(__file__).parent
SAME_ROWS = ["shares", "hist", "experts", "losses"]  # tables with rows at every window, like "gates"


def watch_for(model: nn.Module, log_dir: Path, **kwargs) -> gw.GateWatch:
    options = {"tasks": TASKS, "every": 1, "flush_every": 1, "tensorboard": False, **kwargs}
    return gw.GateWatch(model, log_dir=log_dir, **options)


CUT_SHORT = "its flush has no commit record (cut short by a crash, or still being written); skipped"


def assert_complete_flushes(run: gw.Run, every: int = 1) -> int:
    """Every window from the first to the last is there exactly once, in every table; returns the last step.

    The only problems allowed are the parts of a flush a crash cut short (named, and left out)."""
    assert all(p.endswith(CUT_SHORT) for p in run.problems), run.problems
    steps = run.gates.groupby("gate")["step"].apply(list)
    last = int(run.gates["step"].max())
    for gate_steps in steps:
        assert gate_steps == list(range(every, last + 1, every))
    for name in SAME_ROWS:
        assert sorted(set(run.table(name)["step"])) == list(range(every, last + 1, every)), name
    per_window = run.shares.groupby(["step", "gate"]).size()
    assert (per_window == 4).all()  # 4 experts, no row twice
    return last


# ---------------------------------------------------------------- crashes
CHILD = r"""
import sys
sys.path.insert(0, sys.argv[2])
import torch
from conftest import batch, task_losses, tiny_mmoe
import gatewatch as gw
model = tiny_mmoe()
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
watch = gw.GateWatch(model, tasks=model.tasks, log_dir=sys.argv[1], every=1, flush_every=2)
watch.writer.compact_every = 4  # merges every 8 steps, levelled merges every 32 and 128
step = 0
while True:
    x, y = batch(step, n=16)
    watch.backward(task_losses(model(x), y, model.tasks))
    opt.step()
    opt.zero_grad()
    watch.step()
    step += 1
"""


def recorded_steps(path: Path) -> int:
    try:
        return int(json.loads((path / "run.json").read_text())["steps"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_mid_run_leaves_a_run_that_reads_up_to_its_last_complete_flush(tmp_path, capsys) -> None:
    rng = random.Random(8)
    runs = []
    try:
        for i in range(3):  # in parallel: each is killed at its own moment, most likely inside a write
            path = tmp_path / f"run{i}"
            proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(TESTS)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            runs.append((proc, path, rng.randint(20, 70), rng.uniform(0.0, 0.004)))
        for proc, path, target, delay in runs:
            deadline = time.monotonic() + 240

            def wait_for(ready: Callable[[], bool], proc=proc, deadline=deadline) -> None:
                while not ready():
                    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                    assert time.monotonic() < deadline, "the training process did not get going"
                    time.sleep(0.0005)

            wait_for(lambda path=path, target=target: recorded_steps(path) >= target)
            gates = path / "tables" / "gates"
            seen = set(os.listdir(gates))
            wait_for(lambda gates=gates, seen=seen: set(os.listdir(gates)) != seen)  # a flush is being written
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL
    finally:
        for proc, *_ in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for _, path, target, _ in runs:
        run = gw.load_run(path)
        assert run.status == "cut off" and run.meta["status"] == "running"
        last = assert_complete_flushes(run)
        assert last >= target and run.steps >= last >= run.meta["steps"]
        assert cli.main(["report", str(path)]) in (cli.EXIT_OK, cli.EXIT_FINDINGS)
        assert f"(cut off, {run.steps} steps)" in capsys.readouterr().out
        assert cli.main(["report", str(path), "--json"]) in (cli.EXIT_OK, cli.EXIT_FINDINGS)
        report = json.loads(capsys.readouterr().out)
        assert report["status"] == "cut off" and report["steps"] == run.steps and report["problems"] == run.problems
        assert {g["name"] for g in report["gates"]} == set(TASKS)


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing in gatewatch catches it."""


@contextlib.contextmanager
def crash_at(op: int, root: Path) -> Iterator[list[int]]:
    """Make the ``op``-th rename or removal under ``root`` die before it happens (count in the list)."""
    count = [0]
    real_replace, real_unlink = os.replace, Path.unlink

    def tick(path: os.PathLike) -> None:
        if Path(path).is_relative_to(root):
            count[0] += 1
            if count[0] == op:
                raise Crash

    def replace(src, dst, *args, **kwargs):
        tick(dst)
        return real_replace(src, dst, *args, **kwargs)

    def unlink(self, *args, **kwargs):
        if not self.name.startswith("."):  # leftover temporaries are not part of the state
            tick(self)
        return real_unlink(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", replace)
        mp.setattr(Path, "unlink", unlink)
        yield count


def recorded_flushes(path: Path, steps: int) -> list[dict[str, pd.DataFrame]]:
    """The tables a GateWatch hands its run directory at each of ``steps`` flushes."""
    model = tiny_mmoe()
    watch = watch_for(model, path)
    flushes, write = [], watch.writer.write
    watch.writer.write = lambda tables: write(tables) if flushes.append(tables) is None else False
    train(model, watch, steps, n=8)
    watch.close()
    return flushes[:steps]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_a_crash_at_any_file_operation_of_a_flush_loses_and_duplicates_nothing(tmp_path) -> None:
    flushes = recorded_flushes(tmp_path / "source", 8)
    template = tmp_path / "template"
    writer = RunDirWriter(template, compact_every=2)  # flush 8 ends with a merge of every table into one file
    for tables in flushes[:7]:
        writer.write(tables)
    writer.write_meta({"format": "gatewatch-run/1", "status": "running", "steps": 7, "tasks": TASKS,
                       "host": socket.gethostname(), "pid": dead_pid()})

    def last_flush(op: int) -> tuple[Path, int]:
        path = tmp_path / f"crash{op}"
        shutil.copytree(template, path)
        with crash_at(op, path) as count, contextlib.suppress(Crash):
            RunDirWriter(path, compact_every=2).write(flushes[7])
        return path, count[0]

    _, ops = last_flush(0)
    assert ops > 20  # 5 tables and a commit record, then a merge and removals in each of the 6 folders
    for op in range(1, ops + 1):
        path, count = last_flush(op)
        assert count == op
        run = gw.load_run(path)
        assert run.status == "cut off" and assert_complete_flushes(run) in (7, 8)


@pytest.mark.slow
def test_parts_and_chunks_left_by_a_crashed_merge_are_read_once(tmp_path) -> None:
    path = tmp_path / "run"
    model = tiny_mmoe()
    with watch_for(model, path) as watch:
        watch.writer.compact_every = 2
        train(model, watch, 11, n=8)
        watch.writes.drain()  # the writer thread has written the flushes handed over
        before = {name: gw.load_run(path).table(name) for name in ["gates", *SAME_ROWS]}
        folder = path / "tables" / "gates"
        files = sorted(folder.iterdir())
        assert [f.name for f in files] == ["chunk-000001-000008.parquet", "chunk-000009-000010.parquet",
                                           "part-000011.parquet"]
        saved = {f.name: f.read_bytes() for f in files}
        watch.writer.compact()  # the merge at close, then its inputs put back: a crash before the removals
        for name, data in saved.items():
            (folder / name).write_bytes(data)
        assert len(list(folder.iterdir())) == len(files) + 1
        run = gw.load_run(path)
        for name, df in before.items():
            pd.testing.assert_frame_equal(run.table(name), df)
        assert run.problems == []


def test_a_part_without_commit_record_is_skipped_and_named(tmp_path) -> None:
    path = tmp_path / "run"
    model = tiny_mmoe()
    with watch_for(model, path, every=2, flush_every=4) as watch:
        train(model, watch, 12, n=8)
    gates = path / "tables" / "gates"
    shutil.copy(next(gates.glob("*.parquet")), gates / "part-000099.parquet")  # a flush cut short
    run = gw.load_run(path)
    assert run.gates["step"].tolist() == [s for s in range(2, 13, 2) for _ in TASKS]
    assert len(run.problems) == 1 and "part-000099.parquet: its flush has no commit record" in run.problems[0]


# ---------------------------------------------------------------- corrupt and foreign files
@pytest.fixture
def finished_run(tmp_path) -> Path:
    path = tmp_path / "run"
    model = tiny_mmoe()
    with watch_for(model, path, every=2, flush_every=4) as watch:
        watch.writer.compact = lambda **_: None  # keep one part per flush (4 flushes of 2 windows), even at close
        train(model, watch, 16, n=8)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("damage, why", [
    (lambda data: data[: len(data) // 2], "not a readable Parquet file"),
    (lambda data: b"", "not a readable Parquet file"),
    (lambda data: os.urandom(len(data)), "not a readable Parquet file"),
])
def test_a_damaged_part_is_named_and_skipped(finished_run, damage: Callable[[bytes], bytes], why: str) -> None:
    part = finished_run / "tables" / "shares" / "part-000002.parquet"
    part.write_bytes(damage(part.read_bytes()))
    run = gw.load_run(finished_run)
    assert len(run.problems) == 1 and run.problems[0].startswith(f"{part}: {why}")
    assert sorted(set(run.shares["step"])) == [2, 4, 10, 12, 14, 16]  # flush 2 held steps 6 and 8
    assert sorted(set(run.gates["step"])) == list(range(2, 17, 2))


@pytest.mark.slow
@pytest.mark.parametrize("columns, why", [
    ({"step": ["a", "b"], "gate": ["ctr", "like"], "share": [0.5, 0.5]}, "columns of the wrong type"),
    ({"user": [1, 2], "comment": ["x", "y"]}, "not a gatewatch 'shares' table"),
    ({"step": [None, None], "gate": ["ctr", "like"], "expert": [0, 1]}, "no row has all of"),
])
def test_a_foreign_parquet_file_is_named_and_skipped(finished_run, columns: dict, why: str) -> None:
    part = finished_run / "tables" / "shares" / "part-000002.parquet"
    pd.DataFrame(columns).to_parquet(part)
    run = gw.load_run(finished_run)
    assert len(run.problems) == 1 and why in run.problems[0] and str(part) in run.problems[0]
    assert sorted(set(run.gates["step"])) == list(range(2, 17, 2))


@pytest.mark.slow
def test_run_json_of_wrong_types_is_named_and_the_tables_still_load(finished_run) -> None:
    meta = json.loads((finished_run / "run.json").read_text())
    meta.update(steps="many", tasks={"ctr": 1}, pid=2**80, gates=[1, {"name": ["x"]}, {"name": "ctr"}])
    (finished_run / "run.json").write_text(json.dumps(meta))
    run = gw.load_run(finished_run)
    assert run.steps == 16 and run.tasks == [] and run.gate_names == ["ctr"]
    assert len(run.problems) == 3 and all(str(finished_run / "run.json") in p for p in run.problems)
    assert cli.main(["report", str(finished_run)]) in (cli.EXIT_OK, cli.EXIT_FINDINGS)


def test_a_symlink_out_of_the_run_directory_is_not_followed(finished_run, tmp_path) -> None:
    outside = tmp_path / "elsewhere.parquet"
    part = finished_run / "tables" / "shares" / "part-000002.parquet"
    shutil.move(part, outside)
    part.symlink_to(outside)
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"format": "gatewatch-run/1", "name": "not this run"}))
    (finished_run / "run.json").unlink()
    (finished_run / "run.json").symlink_to(secret)
    run = gw.load_run(finished_run)
    assert run.name == finished_run.name
    assert sorted(p.split(":")[0] for p in run.problems) == sorted([str(finished_run / "run.json"), str(part)])
    assert all("links outside the run directory" in p for p in run.problems)
    assert sorted(set(run.shares["step"])) == [2, 4, 10, 12, 14, 16]


# ---------------------------------------------------------------- NaN and Inf
def poison(module: nn.Module, at_step: Callable[[], int], step: int, rows: slice, value: float):
    """A forward hook (registered before the watch's) that writes ``value`` into some rows at one step."""

    def hook(_module, _inputs, output):
        if at_step() == step:
            output = output.clone()
            output[rows, 0] = value
            return output
        return None

    return module.register_forward_hook(hook, prepend=True)  # runs before the watch's hook


def forward_only(model: nn.Module, watch: gw.GateWatch, steps: int, drop_rows_at: int | None = None) -> None:
    """Forward passes only (the model does not change), so runs with and without bad rows compare exactly."""
    for i in range(steps):
        x, _ = batch(i, n=16)
        if i + 1 == drop_rows_at:
            x = x[4:]
        model(x)
        watch.step()


@pytest.mark.slow
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_gate_rows_are_left_out_of_the_window_and_reported_at_their_step(tmp_path, value) -> None:
    poisoned, reference = tiny_mmoe(), tiny_mmoe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with watch_for(poisoned, tmp_path / "bad", every=10, flush_every=20) as watch:
            poison(poisoned.gates["ctr"][2], lambda: watch.step_count + 1, 37, slice(0, 4), value)
            forward_only(poisoned, watch, 60)
    with watch_for(reference, tmp_path / "ref", every=10, flush_every=20) as watch:
        forward_only(reference, watch, 60, drop_rows_at=37)
    bad, ref = gw.load_run(tmp_path / "bad"), gw.load_run(tmp_path / "ref")
    assert [str(w.message) for w in caught if "NaN/Inf" in str(w.message)] == [
        "gatewatch: gate 'ctr' produced NaN/Inf weights first at step 37; those samples are left out of its "
        "statistics."]
    flagged = bad.gates.set_index(["gate", "step"])
    assert flagged.loc[("ctr", 40), "nonfinite"] == 4 and flagged.loc[("ctr", 40), "first_nonfinite_step"] == 37
    assert flagged["nonfinite"].sum() == 4
    clean_cols = [c for c in bad.gates.columns if c not in ("nonfinite", "first_nonfinite_step")]
    ctr = bad.gates["gate"] == "ctr"
    pd.testing.assert_frame_equal(bad.gates.loc[ctr, clean_cols].reset_index(drop=True),
                                  ref.gates.loc[ref.gates["gate"] == "ctr", clean_cols].reset_index(drop=True))
    for name in ("shares", "hist"):
        table, other = bad.table(name), ref.table(name)
        pd.testing.assert_frame_equal(table[table["gate"] == "ctr"].reset_index(drop=True),
                                      other[other["gate"] == "ctr"].reset_index(drop=True))
    assert bad.events[["step", "kind", "source"]].values.tolist() == [[37, "nonfinite", "ctr"]]
    found = [f for f in gw.find(bad) if f.code == "nonfinite"]
    assert [(f.gate, f.step, f.severity) for f in found] == [("ctr", 37, "error")]


@pytest.mark.slow
def test_nan_that_wrecks_the_model_never_stops_training(tmp_path) -> None:
    model = tiny_mmoe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch_for(model, tmp_path / "run", every=10, flush_every=10) as watch:
            poison(model.gates["ctr"][2], lambda: watch.step_count + 1, 37, slice(0, 1), float("nan"))
            train(model, watch, 60, n=16)  # NaN reaches the loss, the gradients, then every parameter
    assert watch.step_count == 60 and not torch.isfinite(model.gates["like"][0].weight).any()
    run = gw.load_run(tmp_path / "run")
    assert run.status == "finished" and sorted(set(run.gates["step"])) == list(range(10, 61, 10))
    gates = run.gates.set_index(["gate", "step"])
    first_bad = gates["first_nonfinite_step"].dropna()
    assert first_bad.loc[("ctr", 40)] == 37 and first_bad.loc[("like", 40)] == 39
    assert gates.loc[("ctr", 60), "samples"] == 0 and gates.loc[("ctr", 60), "nonfinite"] == 160
    found = {(f.gate, f.task, f.step) for f in gw.find(run) if f.code == "nonfinite"}
    assert found == {("ctr", "ctr", 37), (None, "ctr", 37), (None, "like", 38), ("like", "like", 39)}


def nan_loss_run(path: Path, *, poison_loss: bool) -> None:
    model = tiny_mmoe()
    with watch_for(model, path, every=10, flush_every=10) as watch:
        train_with_nan_loss(model, watch, poison_loss=poison_loss)


def train_with_nan_loss(model: nn.Module, watch: gw.GateWatch, *, poison_loss: bool) -> None:
    """Train 60 steps; at step 37 the update is skipped (as a GradScaler does on Inf/NaN), and with
    ``poison_loss`` the loss of task "ctr" is NaN there."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(60):
        x, y = batch(i, n=16)
        losses = task_losses(model(x), y, TASKS)
        if i + 1 == 37 and poison_loss:
            losses["ctr"] = losses["ctr"] * float("nan")
        watch.backward(losses)
        if i + 1 != 37:
            opt.step()
        opt.zero_grad()
        watch.step()


@pytest.mark.slow
def test_nan_loss_is_an_event_and_a_finding_at_its_step_and_spares_the_gate_statistics(tmp_path) -> None:
    with pytest.warns(RuntimeWarning, match="the loss of task 'ctr' was NaN/Inf first at step 37"):
        nan_loss_run(tmp_path / "bad", poison_loss=True)
    nan_loss_run(tmp_path / "ref", poison_loss=False)
    bad, ref = gw.load_run(tmp_path / "bad"), gw.load_run(tmp_path / "ref")
    pd.testing.assert_frame_equal(bad.gates, ref.gates)
    losses = bad.losses.set_index(["task", "step"])["loss"]
    assert losses.isna().tolist() == [(task, step) == ("ctr", 40) for task, step in losses.index]
    assert bad.events[["step", "kind", "source"]].values.tolist() == [[37, "nonfinite_loss", "ctr"]]
    assert [(f.code, f.task, f.step) for f in gw.find(bad)
            if f.code == "nonfinite"] == [("nonfinite", "ctr", 37)]


@pytest.mark.slow
def test_nan_gradient_shows_in_the_conflict_table_and_becomes_a_finding(tmp_path) -> None:
    model = tiny_mmoe()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    shared = model.experts[0][0].weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch_for(model, tmp_path / "run", every=10, flush_every=10, conflict_every=1) as watch:
            for i in range(40):
                x, y = batch(i, n=16)
                losses = task_losses(model(x), y, TASKS)
                if i + 1 == 37:  # adds 0 to the loss, NaN to its gradient (sqrt'(0) * 0)
                    losses["like"] = losses["like"] + torch.sqrt((shared - shared.detach()).abs().sum())
                watch.backward(losses)
                if all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None):
                    opt.step()
                opt.zero_grad()
                watch.step()
    run = gw.load_run(tmp_path / "run")
    assert torch.isfinite(shared).all() and run.losses["loss"].notna().all()
    assert [(f.task, f.step) for f in gw.find(run) if f.code == "nonfinite"] == [("like", 37)]


@pytest.mark.slow
def test_hard_stop_raises_at_the_flush_after_the_bad_step_and_keeps_the_record(tmp_path) -> None:
    model = tiny_mmoe()
    watch = watch_for(model, tmp_path / "run", every=10, flush_every=10, on_nonfinite="raise")
    with pytest.raises(gw.NonFiniteGateError, match="the loss of task 'ctr' was NaN/Inf first at step 37") as stop:
        train_with_nan_loss(model, watch, poison_loss=True)
    assert watch.step_count == 40
    watch.close(error=stop.value)
    run = gw.load_run(tmp_path / "run")
    assert run.meta["status"] == "crashed" and "NonFiniteGateError" in run.error
    assert run.events["step"].tolist() == [37] and run.gates["step"].max() == 40


@pytest.mark.slow
def test_hard_stop_with_flush_every_1_stops_at_the_bad_step(tmp_path) -> None:
    model = tiny_mmoe()
    watch = watch_for(model, tmp_path / "run", every=1, flush_every=1, on_nonfinite="raise")
    poison(model.gates["ctr"][2], lambda: watch.step_count + 1, 5, slice(0, 1), float("inf"))
    with pytest.raises(gw.NonFiniteGateError, match="gate 'ctr' produced NaN/Inf weights first at step 5"):
        train(model, watch, 10, n=8)
    assert watch.step_count == 5
    watch.close()


# ---------------------------------------------------------------- logging failures
@contextlib.contextmanager
def failing(target: object, name: str, error: OSError, when: Callable[[], bool]) -> Iterator[None]:
    """Make ``target.name`` raise ``error`` while ``when()`` holds."""
    real = getattr(target, name)

    def fake(*args, **kwargs):
        if when():
            raise error
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(target, name, fake)
        yield


def warned(caught: list, text: str) -> int:
    return sum(text in str(w.message) for w in caught)


def train_through(path: Path, broken: Callable[[gw.GateWatch], contextlib.AbstractContextManager], steps: int = 60,
                  **kwargs) -> list:
    """Train ``steps`` steps with writes broken as ``broken(watch)`` says; return the warnings."""
    model = tiny_mmoe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with watch_for(model, path, every=5, flush_every=10, **kwargs) as watch, broken(watch):
            train(model, watch, steps, n=8)
    return caught


def while_steps(watch: gw.GateWatch, first: int, last: int) -> Callable[[], bool]:
    """True while the flush being written is that of a step in ``first..last`` (the writer thread writes it while
    training goes on)."""
    return lambda: first <= (watch.writer.head["step"] or 0) <= last


@pytest.mark.slow
def test_disk_full_is_reported_once_and_nothing_is_lost(tmp_path) -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    caught = train_through(tmp_path / "run",
                           lambda w: failing(run_format.pq, "write_table", full, while_steps(w, 11, 40)))
    assert warned(caught, "could not write tables") == 1 and warned(caught, "No space left on device") == 1
    assert warned(caught, "works again") == 1
    run = gw.load_run(tmp_path / "run")
    assert assert_complete_flushes(run, every=5) == 60
    assert run.events[["step", "kind"]].values.tolist() == [[15, "write_failure"]]
    assert not list((tmp_path / "run").rglob(".*.tmp-*"))  # no temporary file left behind


@pytest.mark.slow
def test_permission_denied_is_reported_once_per_file_kind_and_nothing_is_lost(tmp_path) -> None:
    path = tmp_path / "run"
    denied = PermissionError(errno.EACCES, "Permission denied")
    caught = train_through(path, lambda w: failing(os, "replace", denied, while_steps(w, 11, 40)))
    assert warned(caught, "could not write tables") == 1 and warned(caught, "could not write run.json") == 1
    run = gw.load_run(path)
    assert assert_complete_flushes(run, every=5) == 60 and run.meta["status"] == "finished"


@pytest.mark.slow
def test_run_directory_removed_mid_run_is_recreated_and_the_run_goes_on(tmp_path) -> None:
    path = tmp_path / "run"

    @contextlib.contextmanager
    def remove_at_30(watch: gw.GateWatch) -> Iterator[None]:
        def remove(*_: object) -> None:
            if watch.step_count == 30 and path.exists():
                watch.writes.drain()  # once the flush of step 30 is written
                shutil.rmtree(path)

        hook = watch.model.register_forward_pre_hook(remove)
        yield
        hook.remove()

    caught = train_through(path, remove_at_30, tensorboard=True)
    assert warned(caught, "run directory was removed") == 1
    run = gw.load_run(path)
    assert run.meta["status"] == "finished" and run.steps == 60 and run.problems == []
    assert sorted(set(run.gates["step"])) == list(range(35, 61, 5))
    assert run.events[["step", "kind"]].values.tolist() == [[35, "run_dir_recreated"]]
    assert tensorboard_steps(path / "tensorboard", "loss/ctr") == list(range(35, 61, 5))


def tensorboard_steps(folder: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = set()
    for file in folder.glob("events.out.tfevents.*"):
        events = EventAccumulator(str(file))
        events.Reload()
        if tag in events.Tags()["scalars"]:
            steps |= {e.step for e in events.Scalars(tag)}
    return sorted(steps)


@pytest.mark.slow
def test_tensorboard_failures_are_reported_once_and_retried(tmp_path) -> None:
    path = tmp_path / "run"
    broken = OSError(errno.EIO, "Input/output error")
    caught = train_through(path, lambda w: failing(TensorBoardSink, "_write", broken, while_steps(w, 11, 40)),
                           tensorboard=True)
    assert warned(caught, "could not write TensorBoard events") == 1
    assert warned(caught, "writes TensorBoard events") == 1
    assert tensorboard_steps(path / "tensorboard", "loss/ctr") == list(range(5, 61, 5))
    assert assert_complete_flushes(gw.load_run(path), every=5) == 60


@pytest.mark.slow
def test_rows_kept_through_a_long_outage_are_bounded_and_the_loss_is_recorded(tmp_path) -> None:
    path = tmp_path / "run"
    model = tiny_mmoe()
    down = [True]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch = watch_for(model, path, every=5, flush_every=10)
        watch.writer.max_pending_rows = 500  # one flush of this model: 2 windows x 68 rows
        with failing(run_format.pq, "write_table", OSError(errno.ENOSPC, "full"), lambda: down[0]):
            train(model, watch, 100, n=8)
            assert sum(len(df) for _, t in watch.writer.pending for df in t.values()) <= 500
            down[0] = False
            watch.close()
    assert warned(caught, "older rows are dropped") == 1
    run = gw.load_run(path)
    assert sorted(set(run.gates["step"])) == list(range(65, 101, 5))  # the last 4 flushes fit in 500 rows
    assert run.events[["step", "kind"]].values.tolist() == [[5, "rows_dropped"], [5, "write_failure"]]
    assert "steps 5..60 (6 flushes)" in run.events["message"].iloc[0]


# ---------------------------------------------------------------- wrong use
def test_a_gate_path_that_does_not_exist_names_the_close_ones(tmp_path) -> None:
    with pytest.raises(gw.GateDiscoveryError, match=r"No module at path 'gates\.ctr\.3'.*'gates\.ctr\.2'"):
        watch_for(tiny_mmoe(), tmp_path, gates={"ctr": "gates.ctr.3", "like": "gates.like.2"})


class OneDimGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, -1).sum(-1)


@pytest.mark.parametrize("gates, match", [
    ({"ctr": "gates.ctr.0", "like": "gates.like.0"}, r'not 1: it does not look like probabilities.*output="logits"'),
    ({"ctr": gw.Gate("gates.ctr.2", extract=lambda out: out[:, 0])}, r"shape \(16,\); expected \[N, E\]"),
    ({"ctr": gw.Gate("gates.ctr.2", extract=lambda out: [out])}, r"returned list, not a tensor"),
])
def test_a_gate_output_that_is_not_a_distribution_fails_at_the_first_forward(tmp_path, gates, match) -> None:
    model = tiny_mmoe()
    watch = watch_for(model, tmp_path, gates=gates)
    with pytest.raises(gw.GateOutputError, match=match):
        model(batch(0, n=16)[0])
    watch.close()


def test_losses_that_do_not_match_the_tasks_fail_clearly(tmp_path) -> None:
    model = tiny_mmoe()
    with watch_for(model, tmp_path) as watch:
        x, y = batch(0, n=8)
        losses = task_losses(model(x), y, TASKS)
        with pytest.raises(ValueError, match=r"losses has tasks \['click', 'like'\] but the watch expects"):
            watch.backward({"click": losses["ctr"], "like": losses["like"]})
        with pytest.raises(ValueError, match="Got 1 losses for tasks"):
            watch.log_losses([losses["ctr"]])


@pytest.mark.slow
def test_every_call_after_close_fails_clearly_and_the_model_is_left_as_it_was(tmp_path) -> None:
    model = tiny_mmoe()
    hooks_before = {name: dict(m._forward_hooks) for name, m in model.named_modules()}
    watch = watch_for(model, tmp_path)
    train(model, watch, 3, n=8)
    watch.close()
    watch.close()  # a second close does nothing
    x, y = batch(0, n=8)
    losses = task_losses(model(x), y, TASKS)
    for call in (watch.step, lambda: watch.backward(losses), lambda: watch.log_losses(losses)):
        with pytest.raises(RuntimeError, match="This GateWatch is closed"):
            call()
    assert {name: dict(m._forward_hooks) for name, m in model.named_modules()} == hooks_before


@pytest.mark.parametrize("kwargs, match", [
    ({"every": 0}, "every must be a positive integer"),
    ({"flush_every": 2.5}, "flush_every must be a positive integer"),
    ({"on_nonfinite": "stop"}, "on_nonfinite must be one of"),
    ({"tasks": ["ctr", "ctr"]}, "tasks must be distinct"),
])
def test_bad_arguments_fail_at_construction(tmp_path, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        watch_for(tiny_mmoe(), tmp_path, **kwargs)


@pytest.mark.slow
def test_two_watches_on_one_model_are_independent(tmp_path) -> None:
    model = tiny_mmoe()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = watch_for(model, tmp_path / "a", every=5, flush_every=5)
    second = watch_for(model, tmp_path / "b", every=5, flush_every=5)
    for i in range(15):
        x, y = batch(i, n=8)
        losses = task_losses(model(x), y, TASKS)
        (first if i < 10 else second).backward(losses)
        opt.step()
        opt.zero_grad()
        second.step()
        if i < 10:
            first.step()
        if i == 9:
            first.close()
            assert [len(g._forward_hooks) for g in (model.gates["ctr"][2], model.gates["like"][2])] == [1, 1]
    second.close()
    assert [len(g._forward_hooks) for g in (model.gates["ctr"][2], model.gates["like"][2])] == [0, 0]
    a, b = gw.load_run(tmp_path / "a"), gw.load_run(tmp_path / "b")
    assert a.steps == 10 and b.steps == 15
    both = b.gates[b.gates["step"] <= 10].reset_index(drop=True)
    pd.testing.assert_frame_equal(a.gates, both)  # the same forward passes, the same statistics
    assert b.losses["step"].tolist() == [15, 15]  # each logged the losses it was given


def test_a_second_open_watch_on_the_same_folder_is_refused(tmp_path) -> None:
    model = tiny_mmoe()
    first = watch_for(model, tmp_path / "run")
    with pytest.raises(ValueError, match="Another GateWatch that is still open writes to"):
        watch_for(tiny_mmoe(), tmp_path / "run" / ".." / "run")
    first.close()
    with pytest.warns(UserWarning, match="already holds a run"):
        watch_for(model, tmp_path / "run").close()


@pytest.mark.slow
def test_attaching_again_after_close_works_and_the_closed_watch_stays_closed(tmp_path) -> None:
    model = tiny_mmoe()
    old = watch_for(model, tmp_path / "old", every=2, flush_every=2)
    train(model, old, 4, n=8)
    old.close()
    new = watch_for(model, tmp_path / "new", every=2, flush_every=2)
    train(model, new, 4, n=8)
    with pytest.raises(RuntimeError, match="closed"):
        old.step()
    new.close()
    assert gw.load_run(tmp_path / "old").steps == 4 and gw.load_run(tmp_path / "new").steps == 4
    assert len(gw.load_run(tmp_path / "old").gates) == 4  # nothing reached the closed watch


# ---------------------------------------------------------------- nothing unsafe loaded
class Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def saved_model_dir(path: Path) -> Path:
    from gatewatch.models import MMoE, factory_ref
    from gatewatch.training import save_model

    model = MMoE(in_dim=6, tasks=TASKS, n_experts=3, expert_hidden=[8], expert_dim=4, tower_hidden=[4])
    save_model(path, model, factory=factory_ref(model), data=None, tasks=TASKS, task_types=["binary", "binary"])
    return path


def test_a_checkpoint_that_needs_pickle_is_refused_and_runs_nothing(tmp_path) -> None:
    from gatewatch.training import CheckpointError, load_model

    path = saved_model_dir(tmp_path / "run")
    marker = tmp_path / "marker.txt"
    state = torch.load(path / "checkpoint.pt", weights_only=True)
    torch.save({**state, "extra": Payload(marker)}, path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="weights_only=True only and refuses it"):
        load_model(path)
    assert not marker.exists()
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload is live: plain pickle would have run it
    assert marker.read_text() == "code ran"


def test_a_factory_outside_gatewatch_is_not_imported_without_permission(tmp_path) -> None:
    from gatewatch.training import CheckpointError, load_model

    path = saved_model_dir(tmp_path / "run")
    module = tmp_path / "code" / "planted_factory.py"
    module.parent.mkdir()
    marker = tmp_path / "imported.txt"
    module.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
                      "from gatewatch.models import MMoE as Model\n")
    meta = json.loads((path / "model.json").read_text())
    (path / "model.json").write_text(json.dumps({**meta, "factory": "planted_factory:Model"}))
    sys.path.insert(0, str(module.parent))
    try:
        with pytest.raises(CheckpointError, match=r"outside the gatewatch package.*allow_factory=True"):
            load_model(path)
        assert not marker.exists() and "planted_factory" not in sys.modules
        model, info = load_model(path, allow_factory=True)  # the user's explicit choice
        assert marker.exists() and info.factory == "planted_factory:Model" and isinstance(model, nn.Module)
    finally:
        sys.path.remove(str(module.parent))
        sys.modules.pop("planted_factory", None)


@pytest.mark.slow
def test_runs_are_only_found_and_read_below_the_root(tmp_path, finished_run) -> None:
    from gatewatch.app.state import OutsideRoot, check_inside, discover

    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(finished_run, root / "inside")
    (root / "escape").symlink_to(finished_run, target_is_directory=True)  # a run outside, linked in
    assert gw.list_runs(root) == [root / "inside"]
    assert [ref.id for ref in discover(root)] == ["inside"]
    check_inside(root, root / "inside")
    part = root / "inside" / "tables" / "gates" / "part-000001.parquet"
    part.unlink()
    part.symlink_to(finished_run / "tables" / "gates" / "part-000001.parquet")
    with pytest.raises(OutsideRoot, match="points outside the dashboard's folder"):
        check_inside(root, root / "inside")
