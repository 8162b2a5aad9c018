"""What a fresh interpreter really loads: the reading side (the report command, the dashboard, ``import gatewatch``)
never loads torch.

The direction of the imports (one ``layers`` contract over every module), the absence of cycles
(``acyclic_siblings``) and the torch-free reading side are import-linter contracts in pyproject.toml, checked by
``make lint``. These tests cover what the contracts cannot see: names a package hands out through a module
``__getattr__``, and package ``__init__`` files as a real import runs them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RUN = REPO / "sample_runs" / "mmoe-p0.5"


def loaded_after(script: str, *args: str) -> list[str]:
    """Run ``script`` in a fresh interpreter; return the heavy modules loaded by then and its last line."""
    probe = (
        "\nimport sys as _sys\n"
        "print('LOADED', ','.join(m for m in ('torch', 'gatewatch.watch', 'gatewatch.training.loop') "
        "if m in _sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script + probe, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("LOADED"), done.stdout[-2000:]
    return [m for m in last.removeprefix("LOADED").strip().split(",") if m]


def test_import_gatewatch_loads_no_torch() -> None:
    assert loaded_after("import gatewatch\nassert gatewatch.__version__") == []


@pytest.mark.slow
def test_report_command_loads_no_torch() -> None:
    script = (
        "import sys\n"
        "from gatewatch.cli import main\n"
        "code = main(['report', sys.argv[1]])\n"
        "assert code in (0, 1), code\n"
        "main(['report', sys.argv[1], '--json'])\n"
    )
    assert SAMPLE_RUN.is_dir()
    assert loaded_after(script, str(SAMPLE_RUN)) == []


@pytest.mark.slow
def test_dashboard_loads_no_torch() -> None:
    """The dashboard, drawn on a sample run saved with a checkpoint, loads no torch: ablations run in a separate
    ``gatewatch ablate`` process. The import-linter contract already keeps every module of ``gatewatch.app`` off
    torch; this draws the pages it cannot see through (the entry script, which Streamlit runs by path, and the
    Ablations page, which reads model.json and the results) in a fresh interpreter."""
    script = (
        "import os, sys\n"
        "import gatewatch.app.ablations, gatewatch.app.launch\n"
        "from gatewatch.app.state import ENV_ROOT\n"
        "from streamlit.testing.v1 import AppTest\n"
        "os.environ[ENV_ROOT] = sys.argv[1]\n"
        "at = AppTest.from_file(str(gatewatch.app.launch.MAIN), default_timeout=120)\n"
        "at.query_params['run'] = sys.argv[2]\n"
        "at.run()\n"
        "for page in ('overview', 'ablations'):\n"
        "    at.switch_page(f'views/{page}.py').run()\n"
        "    assert not at.exception, (page, [e.value for e in at.exception])\n"
    )
    assert loaded_after(script, str(SAMPLE_RUN.parent), SAMPLE_RUN.name) == []
