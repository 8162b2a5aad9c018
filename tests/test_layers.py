"""How the modules depend on each other: no import cycles, and the reading side (the report command, the
dashboard, ``import gatewatch``) never loads torch.

The forbidden imports (reading side -> torch, capture side -> reading side, figures -> training) are
import-linter contracts in pyproject.toml, checked by ``make lint``. These tests cover what the contracts
cannot see: cycles between single modules, and what a fresh interpreter really loads (package ``__init__``
files included).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RUN = REPO / "sample_runs" / "mmoe-p0.5"


def cycles(graph: grimp.ImportGraph, package: str) -> list[list[str]]:
    """The strongly connected components of more than one module among ``package``'s modules (Tarjan's
    algorithm, iterative): each is a set of modules that import each other, directly or not."""
    modules = sorted(m for m in graph.modules if m == package or m.startswith(package + "."))
    inside = set(modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & inside) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in modules:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if i < len(edges[node]):
                work.append((node, i + 1))
                child = edges[node][i]
                if child not in index:
                    work.append((child, 0))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found


def test_cycle_finder_finds_a_cycle_and_nothing_else() -> None:
    graph = grimp.ImportGraph()
    for a, b in [("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d"), ("p.d", "p.e")]:
        graph.add_import(importer=a, imported=b)
    graph.add_module("p")
    assert cycles(graph, "p") == [["p.a", "p.b", "p.c"]]


def test_no_module_of_gatewatch_imports_itself_back() -> None:
    """No cycle between modules, counting imports at module level and inside functions alike (grimp reads
    both). Left out, because they never run: imports under ``if TYPE_CHECKING:``. Names that a package hands
    out through a module ``__getattr__`` (``gatewatch``, ``gatewatch.ablation``, ``gatewatch.training``) are
    imported with importlib on first access, after the package has finished initialising, so they are not
    edges here and cannot close a cycle at import time."""
    graph = grimp.build_graph("gatewatch", cache_dir=None, exclude_type_checking_imports=True)
    found = cycles(graph, "gatewatch")
    details = []
    for component in found:
        members = set(component)
        for importer in component:
            for imported in sorted(graph.find_modules_directly_imported_by(importer) & members):
                lines = [d["line_number"] for d in graph.get_import_details(importer=importer, imported=imported)]
                details.append(f"{importer} -> {imported} (line {', '.join(map(str, lines))})")
    assert not found, "import cycles:\n" + "\n".join(details)


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
