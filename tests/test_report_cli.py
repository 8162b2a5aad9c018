"""End to end: train a small MMoE with GateWatch, then read the run with load_run, TensorBoard and
``gatewatch report`` (JSON schema, text, exit codes)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_mmoe, train

import gatewatch as gw
from gatewatch.cli import EXIT_BAD_INPUT, EXIT_FINDINGS, EXIT_OK, main

TASKS = ["ctr", "like"]
TOP_KEYS = {"run", "path", "status", "steps", "tasks", "gates", "experts", "conflict", "findings", "thresholds",
            "problems"}
GATE_KEYS = {"name", "task", "level", "experts", "expert_names", "expert_share", "entropy", "polarization",
             "max_weight", "top_share", "effective_experts", "mutual_info", "step"}
FINDING_KEYS = {"code", "severity", "gate", "task", "expert", "step", "message", "remedy", "chart", "value", "unit"}


def trained_run(path: Path, *, broken: bool) -> Path:
    """300 training steps; ``broken``: the 'like' gate fixed on expert 0, expert 3 masked out of every gate."""
    model = tiny_mmoe(n_experts=4)
    if broken:
        model.force_gate("like", [15.0, 0.0, 0.0, -30.0])
        model.gates["ctr"][1].offset[3] = -30.0  # a trainable gate that can never pick expert 3
    with gw.GateWatch(model, tasks=TASKS, log_dir=path, every=10, flush_every=100) as watch:
        train(model, watch, 300, n=32)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {name: trained_run(root / name, broken=name == "broken") for name in ("broken", "healthy")}


def report_json(capsys, path: Path, *args: str) -> tuple[int, dict]:
    code = main(["report", str(path), "--json", *args])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_broken_run_is_read_by_load_run_tensorboard_and_report(runs, capsys) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = gw.load_run(runs["broken"])
    assert run.status == "finished" and run.steps == 300 and run.problems == []
    assert len(run.gates) == 2 * 30 and set(run.losses["task"]) == set(TASKS)
    events = EventAccumulator(str(runs["broken"] / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("gate/like/top_share")) == 30 and events.Scalars("gate/like/top_share")[-1].value > 0.99

    code, report = report_json(capsys, runs["broken"])
    assert code == EXIT_FINDINGS
    found = {(f["code"], f["gate"], f["expert"]) for f in report["findings"]}
    assert ("polarization", "like", None) in found and ("dead_expert", None, "3") in found
    assert not any(f["gate"] == "ctr" and f["severity"] == "error" for f in report["findings"])
    assert report["experts"]["dead"] == [3] and report["experts"]["utilization"][3] < 1e-6


@pytest.mark.slow
def test_healthy_run_reports_no_error(runs, capsys) -> None:
    code, report = report_json(capsys, runs["healthy"])
    assert code == EXIT_OK, report["findings"]
    assert [f for f in report["findings"] if f["severity"] == "error"] == []


def test_report_json_follows_the_documented_schema(runs, capsys) -> None:
    _, report = report_json(capsys, runs["broken"])
    assert set(report) >= TOP_KEYS
    assert (report["run"], report["status"], report["steps"], report["tasks"]) == ("broken", "finished", 300, TASKS)
    assert [g["name"] for g in report["gates"]] == TASKS
    for g in report["gates"]:
        assert set(g) == GATE_KEYS
        assert g["experts"] == 4 and g["expert_names"] == ["0", "1", "2", "3"] and g["step"] == 300
        assert sum(g["expert_share"]) == pytest.approx(1.0) and 0 <= g["entropy"] <= 1 and 0 <= g["mutual_info"] <= 1
    assert set(report["experts"]) == {"names", "utilization", "dead", "load_cv"}
    assert report["experts"]["names"] == ["0", "1", "2", "3"]
    for f in report["findings"]:
        assert set(f) == FINDING_KEYS and f["severity"] in ("error", "warning", "info")
    assert report["thresholds"] == gw.Thresholds().to_dict() and report["problems"] == []
    assert isinstance(report["conflict"], list)
    json.dumps(report, allow_nan=False)  # strict JSON: no NaN anywhere


def test_text_report_and_threshold_override(runs, capsys) -> None:
    assert main(["report", str(runs["broken"])]) == EXIT_FINDINGS
    text = capsys.readouterr().out
    assert "[ERROR] polarization" in text and "remedy:" in text and "dead: [3]" in text
    code, report = report_json(capsys, runs["broken"], "--threshold", "collapse_share=1.01")
    assert code == EXIT_OK and report["thresholds"]["collapse_share"] == 1.01
    assert main(["report", str(runs["healthy"])]) == EXIT_OK
    assert "none: the gates look healthy" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (lambda tmp: tmp / "missing", [], "is not a folder"),
        (lambda tmp: tmp, [], "is not a gatewatch run"),
        (None, ["--threshold", "nope=1"], "Unknown thresholds"),
        (None, ["--threshold", "collapse_share"], "NAME=VALUE"),
    ],
)
def test_bad_input_exits_2_with_a_message_on_stderr(runs, tmp_path, capsys, make, args, message) -> None:
    path = make(tmp_path) if make else runs["healthy"]
    assert main(["report", str(path), *args]) == EXIT_BAD_INPUT
    out = capsys.readouterr()
    assert out.out == "" and message in out.err and out.err.startswith("gatewatch report:")


def test_cut_off_run_reports_its_status(runs, tmp_path, capsys) -> None:
    path = tmp_path / "copy"
    shutil.copytree(runs["healthy"], path)
    meta = json.loads((path / "run.json").read_text())
    meta.update(status="running", pid=2**22 + 7)  # above Linux's default pid_max: no such process
    (path / "run.json").write_text(json.dumps(meta))
    code, report = report_json(capsys, path)
    assert code == EXIT_OK and report["status"] == "cut off"


@pytest.mark.slow
def test_console_script_entry_point(runs) -> None:
    exe = Path(sys.executable).with_name("gatewatch")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gatewatch.cli"]
    done = subprocess.run([*cmd, "report", str(runs["broken"]), "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_FINDINGS and json.loads(done.stdout)["status"] == "finished"
