"""Run summaries: written by the run-directory sink at each flush and at close, read alone by the Runs page and
``gw.run_summaries``; runs without one are read in full once (tests/test_old_runs.py: where their summary is kept).
The Runs page's explorer filters and sorts them."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_tracker_sinks import STEPS, train

import gatewatch as gw
from gatewatch import summary_cache
from gatewatch.app import data, explorer, state
from gatewatch.sinks import Sink
from gatewatch.sinks.live_findings import RecentWindows
from gatewatch.summary import SUMMARY_FILE, read_summary, worst_severity

SAMPLE = Path(__file__).resolve().parents[1] / "sample_runs"


def page_row(root: Path, ref: state.RunRef) -> dict:
    """The Runs page's row of a run: from its kept summary, else after reading it in full as the page does."""
    reads: data.Reads = {}
    if (row := data.kept_row(root, ref, reads)) is None:
        data.read_in_full(root, ref, reads)
        row = data.kept_row(root, ref, reads)
    assert isinstance(row, dict), row
    return row


class Peek(Sink):
    """Reads the run's summary.json at every flush (after the run-directory sink wrote it)."""

    def __init__(self, path: Path) -> None:
        self.path, self.seen = path, []

    def write_meta(self, meta: dict) -> bool:
        if (summary := read_summary(self.path)) is not None:
            self.seen.append(summary)
        return True


@pytest.mark.slow
def test_the_summary_follows_the_run_and_matches_a_full_read(tmp_path: Path) -> None:
    peek = Peek(tmp_path / "run")
    train(tmp_path / "run", [peek])
    assert peek.seen[0]["steps"] == 0 and any(s["status"] == "running" and s["steps"] == 4 for s in peek.seen)
    assert [s["steps"] for s in peek.seen] == sorted(s["steps"] for s in peek.seen)
    summary = read_summary(tmp_path / "run")
    run = gw.load_run(tmp_path / "run")
    assert summary is not None and summary["status"] == "finished" and summary["steps"] == STEPS == run.steps
    assert summary["tasks"] == ["a", "b"] and [g["name"] for g in summary["gates"]] == run.gate_names
    # the last window's numbers, against the gates and losses tables read back
    last = run.gates[run.gates["step"] == run.gates["step"].max()].set_index("gate")
    assert summary["headline"]["step"] == STEPS
    for gate, values in summary["headline"]["gates"].items():
        assert values["polarization"] == pytest.approx(float(last.loc[gate, "polarization"]))
        assert values["effective_experts"] == pytest.approx(float(last.loc[gate, "effective_experts"]))
    losses = run.losses[run.losses["step"] == run.losses["step"].max()]
    want = {t: float(np.mean(g["loss"].to_numpy())) for t, g in losses.groupby("task")}
    assert summary["headline"]["losses"] == pytest.approx(want)
    # the findings at close are those of the report of the recent windows: here, all the windows
    found = gw.find(run)
    assert found and set(summary["findings"]["counts"]) == {f.code for f in found}
    for code, by in summary["findings"]["counts"].items():
        assert by == {s: sum(f.code == code and f.severity == s for f in found) for s in by}
    assert worst_severity(summary) == min((f.severity for f in found), key=["error", "warning", "info"].index)
    assert not list((tmp_path / "run").glob("*.tmp*"))  # written atomically: no temporary file left


@pytest.mark.slow
def test_the_runs_page_reads_the_summary_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train(tmp_path / "run", [], steps=8)
    (ref,) = state.discover(tmp_path)
    run = gw.load_run(ref.path)
    full = state.run_row(ref, run, gw.find(run))  # the row from a full read
    monkeypatch.setattr(summary_cache, "load_run", lambda path: pytest.fail("the Runs page read a whole run"))
    monkeypatch.setattr(data, "load_run", lambda path: pytest.fail("the Runs page read a whole run"))
    row = page_row(tmp_path, ref)
    assert row["steps"] == 8 and row["status"] == "finished" and row["findings"] == full["findings"]
    assert {k: row[k] for k in ("gates", "experts", "tasks / layers", "severity")} == \
        {k: full[k] for k in ("gates", "experts", "tasks / layers", "severity")}


def test_runs_without_a_summary_are_read_in_full(tmp_path: Path) -> None:
    shutil.copytree(SAMPLE / "mmoe-polarized", tmp_path / "old", ignore=shutil.ignore_patterns(SUMMARY_FILE))
    assert not (tmp_path / "old" / SUMMARY_FILE).exists()  # a run written before summaries
    (ref,) = state.discover(tmp_path)
    assert data.kept_row(tmp_path, ref, {}) is None  # waits to be read in full
    row = page_row(tmp_path, ref)
    assert "polarization (error)" in row["findings"] and row["severity"] == "error"
    assert row["config: lr"] == 0.01 and row["config: model_kwargs.n_experts"] == 4
    assert row["problems"] == 0  # counted by the full read
    assert read_summary(tmp_path / "old") is not None  # and its summary kept in the run
    listed = gw.run_summaries(tmp_path)
    assert [s["name"] for s in listed] == ["mmoe-polarized"] and listed[0]["status"] == "finished"
    assert "polarization" in listed[0]["findings"]["counts"]


def test_a_corrupt_summary_falls_back_to_a_full_read(tmp_path: Path) -> None:
    shutil.copytree(SAMPLE / "mmoe-collapsed", tmp_path / "old")
    (tmp_path / "old" / SUMMARY_FILE).write_text("{not json")
    assert read_summary(tmp_path / "old") is None
    (ref,) = state.discover(tmp_path)
    assert page_row(tmp_path, ref)["steps"] == gw.load_run(tmp_path / "old").steps


def test_the_rules_run_at_most_a_hundredth_of_the_time() -> None:
    recent = RecentWindows(cost_ratio=100)
    assert recent.due()
    recent.ran_at, recent.took = time.monotonic(), 0.05  # they took 50 ms: next due in 5 s
    assert not recent.due()
    assert recent.findings(Path("x"), {}) is None  # not due: nothing evaluated
    recent.ran_at -= 5.0
    assert recent.due()


TABLE = pd.DataFrame([
    {"run": "census/lr-0.01-seed1", "status": "finished", "severity": "error", "codes": ["polarization"],
     "findings": ["polarization (error)"], "steps": 2000, "config: lr": 0.01, "config: model": "mmoe"},
    {"run": "census/lr-0.001-seed1", "status": "live", "severity": "healthy", "codes": [], "findings": ["healthy"],
     "steps": 500, "config: lr": 0.001, "config: model": "mmoe"},
    {"run": "synthetic/ple", "status": "cut off", "severity": "warning", "codes": ["dead_expert", "imbalance"],
     "findings": ["dead expert (warning)"], "steps": None, "config: lr": None, "config: model": "ple"},
])


def ids(table: pd.DataFrame) -> list[str]:
    return table["run"].tolist()


def test_the_explorer_filters_by_name_status_severity_code_and_config() -> None:
    assert ids(explorer.filter_runs(TABLE)) == ids(TABLE)
    assert ids(explorer.filter_runs(TABLE, search="CENSUS seed1")) == ids(TABLE)[:2]
    assert ids(explorer.filter_runs(TABLE, statuses=["live", "cut off"])) == ids(TABLE)[1:]
    assert ids(explorer.filter_runs(TABLE, severities=["error"])) == ids(TABLE)[:1]
    assert ids(explorer.filter_runs(TABLE, codes=["imbalance", "polarization"])) == [ids(TABLE)[0], ids(TABLE)[2]]
    assert ids(explorer.filter_runs(TABLE, config={"config: lr": ["0.001"]})) == ids(TABLE)[1:2]
    assert ids(explorer.filter_runs(TABLE, config={"config: model": ["ple"], "config: lr": []})) == ids(TABLE)[2:]
    assert ids(explorer.filter_runs(TABLE, config={"config: missing": ["1"]})) == []
    assert explorer.config_columns(TABLE) == ["config: lr", "config: model"]
    assert explorer.config_values(TABLE, "config: lr") == ["0.001", "0.01"]


def test_the_explorer_sorts_by_any_column() -> None:
    assert ids(explorer.sort_runs(TABLE, "severity")) == [ids(TABLE)[i] for i in (0, 2, 1)]
    assert ids(explorer.sort_runs(TABLE, "steps", descending=True)) == [ids(TABLE)[i] for i in (0, 1, 2)]
    assert ids(explorer.sort_runs(TABLE, "steps")) == [ids(TABLE)[i] for i in (1, 0, 2)]  # missing last
    assert ids(explorer.sort_runs(TABLE, "run")) == sorted(ids(TABLE))
    for column in TABLE.columns:
        assert len(explorer.sort_runs(TABLE, column)) == len(TABLE)
    with pytest.raises(ValueError, match="cannot sort by 'nope'"):
        explorer.sort_runs(TABLE, "nope")


def test_the_summary_is_json_of_plain_values(tmp_path: Path) -> None:
    train(tmp_path / "run", [], steps=4)
    text = (tmp_path / "run" / SUMMARY_FILE).read_text()
    assert json.loads(text)["format"] == "gatewatch-summary/1" and len(text) < 20_000


def test_a_summary_older_than_run_json_is_not_trusted(tmp_path: Path) -> None:
    train(tmp_path / "run", [], steps=4)
    assert read_summary(tmp_path / "run") is not None
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    meta["status"] = "crashed"  # rewritten afterwards, without the summary
    time.sleep(0.01)
    (tmp_path / "run" / "run.json").write_text(json.dumps(meta))
    assert read_summary(tmp_path / "run") is None
    (ref,) = state.discover(tmp_path)
    assert page_row(tmp_path, ref)["status"] == "cut off"


@pytest.mark.slow
def test_the_runs_page_filters_sorts_and_offers_the_filtered_runs(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from test_app import open_app

    for name in ("mmoe-polarized", "mmoe-collapsed", "census-mmoe", "mmoe-p0.5"):
        shutil.copytree(SAMPLE / name, tmp_path / name, ignore=shutil.ignore_patterns("checkpoint.pt", "ablations"))
    at = open_app(tmp_path, monkeypatch, "runs")
    assert not at.exception and len(at.dataframe[0].value) == 4
    at.multiselect(key="runs_codes").set_value(["polarization"]).run()
    assert sorted(at.dataframe[0].value["run"]) == ["mmoe-collapsed", "mmoe-polarized"]
    assert set(at.multiselect(key="selected_widget").options) <= {"mmoe-collapsed", "mmoe-polarized",
                                                                   *at.multiselect(key="selected_widget").value}
    at.text_input(key="runs_search").set_value("collapsed").run()
    assert list(at.dataframe[0].value["run"]) == ["mmoe-collapsed"]
    at.text_input(key="runs_search").set_value("").run()
    at.multiselect(key="runs_codes").set_value([]).run()
    at.selectbox(key="runs_sort").set_value("steps").run()
    at.toggle(key="runs_descending").set_value(True).run()
    shown = at.dataframe[0].value
    assert list(shown["steps"]) == sorted(shown["steps"], reverse=True)
    at.multiselect(key="runs_config_keys").set_value(["config: lr"]).run()
    at.multiselect(key="runs_config_config: lr").set_value(["0.01"]).run()
    assert set(at.dataframe[0].value["config: lr"]) == {0.01}
