"""The Runs page while runs are live: it re-reads their summaries on a timer, keeps the explorer's filters and choice,
and schedules nothing once no listed run is live."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from test_app import no_exception, open_app, texts

from gatewatch.app import ui
from gatewatch.summary import SUMMARY_FILE, read_summary

Check = tuple[Callable[[], tuple], tuple]


def write_run(run: Path, source: Path, *, status: str, steps: int, counts: dict[str, dict[str, int]],
              pid: int | None = None) -> None:
    """Write ``run``'s run.json then summary.json as a writer's flush does: ``status`` "running" is a live run while
    process ``pid`` (default: this one) lives, with ``steps`` and the finding ``counts`` in its summary."""
    live = {"status": status, "ended": None, "pid": pid or os.getpid(), "pid_start": None, "heartbeat": time.time()}
    meta = {**json.loads((source / "run.json").read_text()), **live, "steps": steps}
    summary = {**read_summary(source), **live, "steps": steps,
               "findings": {"step": steps, "counts": counts, "items": []}}
    (run / "run.json").write_text(json.dumps(meta))
    (run / SUMMARY_FILE).write_text(json.dumps(summary))


def rows(at) -> pd.DataFrame:
    return at.dataframe[0].value.set_index("run")


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[Check]:
    """The (check, shown) pairs of the refresh fragments the pages schedule, recorded as each script run draws one."""
    seen: list[Check] = []
    real = ui._rerun_on_change
    monkeypatch.setattr(ui, "_rerun_on_change", lambda check, shown: (seen.append((check, shown)), real(check, shown)))
    return seen


def test_runs_page_follows_a_live_run_until_it_finishes(tmp_path: Path, standard_run_dirs: dict[str, Path],
                                                         monkeypatch: pytest.MonkeyPatch, checks: list[Check]) -> None:
    healthy = standard_run_dirs["healthy"]
    for name in ("growing", "done"):
        shutil.copytree(healthy, tmp_path / name)
    write_run(tmp_path / "growing", healthy, status="running", steps=40, counts={})
    at = open_app(tmp_path, monkeypatch, "runs")
    no_exception(at)
    assert rows(at).loc["growing", ["status", "steps"]].tolist() == ["live", 40]
    assert list(rows(at).loc["growing", "findings"]) == ["healthy"] and rows(at).loc["done", "status"] == "finished"
    assert "1 live run(s): the table refreshes as they write" in texts(at)

    at.text_input(key="runs_search").set_value("grow").run()
    at.multiselect(key="runs_status").set_value(["live"]).run()
    at.multiselect(key="selected_widget").set_value(["growing"]).run()
    check, shown = checks[-1]
    assert check() == shown  # nothing written since the page was drawn: the timer leaves the page alone

    write_run(tmp_path / "growing", healthy, status="running", steps=80, counts={"polarization": {"error": 1}})
    assert check() != shown  # the timer's next check sees the write and reruns the page
    at.run()
    no_exception(at)
    assert list(rows(at).index) == ["growing"]  # the filters are kept
    assert rows(at).loc["growing", "steps"] == 80 and list(rows(at).loc["growing", "findings"]) == [
        "polarization (error)"]
    assert at.text_input(key="runs_search").value == "grow" and at.multiselect(key="runs_status").value == ["live"]
    assert at.multiselect(key="selected_widget").value == ["growing"]
    check, shown = checks[-1]
    assert check() == shown

    write_run(tmp_path / "growing", healthy, status="finished", steps=100, counts={"polarization": {"error": 1}})
    assert check() != shown
    scheduled = len(checks)
    at.run()
    no_exception(at)
    assert at.multiselect(key="runs_status").value == ["live"] and at.dataframe[0].value.empty  # no run is live now
    at.multiselect(key="runs_status").set_value([]).run()
    assert rows(at).loc["growing", ["status", "steps"]].tolist() == ["finished", 100]
    assert len(checks) == scheduled and "live run(s)" not in texts(at)  # no refresh scheduled any more


def test_a_new_run_or_a_dead_writer_is_noticed(tmp_path: Path, standard_run_dirs: dict[str, Path],
                                               monkeypatch: pytest.MonkeyPatch, checks: list[Check]) -> None:
    healthy = standard_run_dirs["healthy"]
    shutil.copytree(healthy, tmp_path / "growing")
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_run(tmp_path / "growing", healthy, status="running", steps=40, counts={}, pid=writer.pid)
        at = open_app(tmp_path, monkeypatch, "runs")
        assert rows(at).loc["growing", "status"] == "live"
        check, shown = checks[-1]
        shutil.copytree(healthy, tmp_path / "second")
        assert check() != shown  # a run appeared below the folder
        shutil.rmtree(tmp_path / "second")
        assert check() == shown
    finally:
        writer.kill()
        writer.wait()
    assert check() != shown  # its process died without writing: the run is no longer live
    at.run()
    assert rows(at).loc["growing", "status"] == "cut off" and "live run(s)" not in texts(at)


def test_no_refresh_without_live_runs_or_when_switched_off(tmp_path: Path, standard_run_dirs: dict[str, Path],
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           checks: list[Check]) -> None:
    for name in ("healthy", "polarized"):
        shutil.copytree(standard_run_dirs[name], tmp_path / name)
    at = open_app(tmp_path, monkeypatch, "runs")
    no_exception(at)
    assert set(rows(at)["status"]) == {"finished"}
    assert not checks and "live run(s)" not in texts(at)

    write_run(tmp_path / "healthy", standard_run_dirs["healthy"], status="running", steps=40, counts={})
    at.run()
    assert len(checks) == 1
    at.sidebar.toggle(key="auto_refresh").set_value(False).run()
    assert len(checks) == 1 and "switch on 'Refresh live runs' in the sidebar to follow them" in texts(at)
