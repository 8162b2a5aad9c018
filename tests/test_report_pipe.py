"""`gatewatch report RUN | head` ends without a traceback: the closed pipe is not an error of the report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE_RUNS = Path(__file__).resolve().parents[1] / "sample_runs"


@pytest.mark.parametrize("json_flag", ["", "--json"])
@pytest.mark.slow
def test_report_into_a_closed_pipe_ends_quietly(json_flag: str) -> None:
    run = SAMPLE_RUNS / "deepseek-routers"
    command = f"'{sys.executable}' -m gatewatch.cli report '{run}' {json_flag} | head -3; exit ${{PIPESTATUS[0]}}"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert len(done.stdout.splitlines()) == 3
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode in (0, 1), done.stderr  # the report's own status: healthy or an error finding
