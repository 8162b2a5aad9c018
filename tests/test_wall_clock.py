"""Reliability in wall-clock time: a slow run killed before its first 100 steps keeps what it did up to its last
flush (``flush_secs``), the heartbeat tells a live run from a dead one, and bad input gets a clear error that
loses nothing already written."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import gatewatch as gw
from gatewatch.cli import main as cli_main
from gatewatch.models import MMoE

TASKS = ["a", "b"]
STEP_S = 0.3

SLOW_LOOP = textwrap.dedent("""
    import sys, time, torch
    import gatewatch as gw
    from gatewatch.models import MMoE
    torch.manual_seed(0)
    model = MMoE(in_dim=8, n_experts=3, expert_hidden=(), expert_dim=4, tasks=["a", "b"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GateWatch(model, tasks=["a", "b"], log_dir=sys.argv[1], every=5)  # flush_every=100, flush_secs=5
    for step in range(1, 1000):
        out = model(torch.randn(16, 8))
        watch.backward({"a": out[0].pow(2).mean(), "b": out[1].abs().mean()})
        opt.step(); opt.zero_grad(); watch.step()
        print(step, flush=True)
        time.sleep(float(sys.argv[2]))
""")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_slow_run_killed_before_step_100_keeps_all_but_its_last_seconds(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_LOOP, str(run_dir), str(STEP_S)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        killed_at = 0
        for line in proc.stdout:
            killed_at = int(line)
            if killed_at >= 40:
                break
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    run = gw.load_run(run_dir)
    flush_steps = math.ceil(5.0 / STEP_S)  # steps in flush_secs
    last = int(run.gates["step"].max())
    assert run.status == "cut off" and 0 < run.steps <= killed_at
    assert last >= killed_at - max(5, flush_steps) - 5, (last, killed_at)  # at most the open window or flush_secs
    assert cli_main(["report", str(run_dir)]) in (0, 1)  # readable: findings or none, not "no data"
    assert "cut off" in capsys.readouterr().out


@pytest.mark.slow
def test_the_heartbeat_is_refreshed_at_each_time_based_flush(tmp_path: Path) -> None:
    model = MMoE(in_dim=8, n_experts=3, expert_hidden=(), expert_dim=4, tasks=TASKS)
    with gw.GateWatch(model, tasks=TASKS, log_dir=tmp_path, every=1, flush_every=1000, flush_secs=0.2,
                      tensorboard=False) as watch:
        beats = []
        for _ in range(6):
            out = model(torch.randn(4, 8))
            watch.backward({"a": out[0].mean(), "b": out[1].mean()})
            time.sleep(0.25)
            watch.step()
            beats.append(json.loads((tmp_path / "run.json").read_text())["heartbeat"])
        assert len(set(beats)) == 6 and beats == sorted(beats)  # every step was a flush: 0.25 s > flush_secs
        assert gw.load_run(tmp_path).status == "live" and len(gw.load_run(tmp_path).gates) == 2 * 6


# ---------------------------------------------------------------- bad input
def test_a_log_dir_that_is_a_file_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "run"
    path.write_text("not a folder")
    with pytest.raises(ValueError, match=r"is a file, not a folder\. Pass a folder path"):
        gw.GateWatch(MMoE(in_dim=8, n_experts=3, tasks=TASKS), tasks=TASKS, log_dir=path)
    assert path.read_text() == "not a folder"


HOLDER = textwrap.dedent("""
    import sys, time
    import gatewatch as gw
    from gatewatch.models import MMoE
    watch = gw.GateWatch(MMoE(in_dim=8, n_experts=3, tasks=["a", "b"]), tasks=["a", "b"], log_dir=sys.argv[1])
    print("open", flush=True)
    time.sleep(60)
""")


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_folder_another_process_writes_is_refused(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
        before = (tmp_path / "run.json").read_bytes()
        with pytest.raises(ValueError, match=rf"being written by another process \(pid {proc.pid}"):
            gw.GateWatch(MMoE(in_dim=8, n_experts=3, tasks=TASKS), tasks=TASKS, log_dir=tmp_path)
        assert (tmp_path / "run.json").read_bytes() == before  # nothing of the other run was touched
    finally:
        proc.kill()
        proc.wait()
    with pytest.warns(UserWarning, match="already holds a run"):  # its writer is gone: the folder can be reused
        gw.GateWatch(MMoE(in_dim=8, n_experts=3, tasks=TASKS), tasks=TASKS, log_dir=tmp_path).close()


def test_a_run_of_a_newer_format_names_the_upgrade(tmp_path: Path, capsys) -> None:
    with gw.GateWatch(MMoE(in_dim=8, n_experts=3, tasks=TASKS), tasks=TASKS, log_dir=tmp_path, every=1) as watch:
        out = watch.model(torch.randn(4, 8))
        watch.backward({"a": out[0].mean(), "b": out[1].mean()})
        watch.step()
    meta = json.loads((tmp_path / "run.json").read_text())
    meta["format"] = "gatewatch-run/7"
    (tmp_path / "run.json").write_text(json.dumps(meta))
    with pytest.raises(gw.RunReadError, match=r"newer gatewatch.*pip install --upgrade gatewatch"):
        gw.load_run(tmp_path)
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "pip install --upgrade gatewatch" in capsys.readouterr().err


def test_report_and_the_dashboard_data_read_a_run_on_a_read_only_filesystem(tmp_path: Path, monkeypatch,
                                                                             capsys) -> None:
    run_dir = tmp_path / "run"
    with gw.GateWatch(MMoE(in_dim=8, n_experts=3, tasks=TASKS), tasks=TASKS, log_dir=run_dir, every=1) as watch:
        for _ in range(3):
            out = watch.model(torch.randn(4, 8))
            watch.backward({"a": out[0].mean(), "b": out[1].mean()})
            watch.step()
    (run_dir / "summary.json").unlink()  # a run written before summaries: the Runs page reads it in full
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).startswith(str(tmp_path)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr("builtins.open", _read_only_builtin_open(tmp_path))
    assert cli_main(["report", str(run_dir), "--json"]) in (0, 1)
    assert json.loads(capsys.readouterr().out)["steps"] == 3
    from gatewatch.app import data, state

    (ref,) = state.discover(tmp_path)
    reads: data.Reads = {}
    data.read_in_full(tmp_path, ref, reads)  # what the Runs page shows of it; its summary goes to the user's cache
    row = reads[ref.id][1]
    assert isinstance(row, dict) and row["steps"] == 3 and ref.path == run_dir
    assert not (run_dir / "summary.json").exists()


def _read_only_builtin_open(root: Path):  # type: ignore[no-untyped-def]
    import builtins

    real = builtins.open

    def opener(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(file).startswith(str(root)) and any(c in mode for c in "wax+"):
            raise OSError(30, "Read-only file system", str(file))
        return real(file, mode, *args, **kwargs)

    return opener


# ---------------------------------------------------------------- no data is not "healthy"
def test_a_run_with_nothing_flushed_exits_2_and_says_why(tmp_path: Path, capsys) -> None:
    watch = gw.GateWatch(MMoE(in_dim=8, n_experts=3, tasks=TASKS), tasks=TASKS, log_dir=tmp_path, flush_secs=None)
    try:
        assert cli_main(["report", str(tmp_path), "--json"]) == 2
        out, err = capsys.readouterr()
        assert json.loads(out)["coverage"] == {"first_step": None, "last_step": None, "skipped_files": []}
        assert "nothing was flushed yet" in err
        assert cli_main(["report", str(tmp_path)]) == 2
        assert "the gates look healthy" not in capsys.readouterr().out
    finally:
        watch.close()


def test_a_run_whose_files_are_unreadable_exits_2_naming_them(tmp_path: Path, capsys) -> None:
    with gw.GateWatch(MMoE(in_dim=8, n_experts=3, tasks=TASKS), tasks=TASKS, log_dir=tmp_path, every=1) as watch:
        out = watch.model(torch.randn(4, 8))
        watch.backward({"a": out[0].mean(), "b": out[1].mean()})
        watch.step()
    damaged = sorted((tmp_path / "tables").glob("*/[pc]*.parquet"))
    for f in damaged:
        f.write_bytes(b"garbage")
    (tmp_path / "run.json").write_text("{not json")
    assert cli_main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "could not be read" in err and str(damaged[-1]) in err


def test_a_partial_run_says_what_it_covers(tmp_path: Path, capsys) -> None:
    with gw.GateWatch(MMoE(in_dim=8, n_experts=3, tasks=TASKS), tasks=TASKS, log_dir=tmp_path, every=1,
                      flush_every=2) as watch:
        for _ in range(4):
            out = watch.model(torch.randn(4, 8))
            watch.backward({"a": out[0].mean(), "b": out[1].mean()})
            watch.step()
        watch.writer.compact = lambda **_: None  # type: ignore[union-attr]  # keep one part per flush
    bad = sorted((tmp_path / "tables" / "gates").glob("part-*.parquet"))[-1]
    bad.write_bytes(b"garbage")
    assert cli_main(["report", str(tmp_path), "--json"]) in (0, 1)
    coverage = json.loads(capsys.readouterr().out)["coverage"]
    assert coverage["first_step"] == 1 and coverage["last_step"] == 4 and coverage["skipped_files"] == [str(bad)]
    cli_main(["report", str(tmp_path)])
    assert "covers: windows of steps 1..4, 1 file(s) skipped" in capsys.readouterr().out
