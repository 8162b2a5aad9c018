"""The proof of the quantity kit: a quantity of its own (the largest gate weight per window) lives in a package
outside gatewatch, installed the documented way (a distribution with an entry point in ``gatewatch.quantities``,
here a package and its ``*.dist-info`` on PYTHONPATH), and no file of gatewatch names it. A training process
logs it; it then shows in the run directory and ``load_run``, ``gatewatch report`` (JSON and text) run as
separate processes, TensorBoard, a tracker sink, and a page of a running ``gatewatch dashboard``. This process
does not have the package: here the run still loads, the table as written, with a note."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import gatewatch as gw
from gatewatch.report import build_report, render_text

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "toy_quantities.max_gate"
FILES = {
    "toy_quantities/__init__.py": "",
    "toy_quantities/max_gate/__init__.py": '"""The largest gate weight per window."""\n',
    "toy_quantities/max_gate/capture.py": '''
        """The largest gate weight per window, capture half: one MAX state per gate."""

        from __future__ import annotations

        import math
        from typing import Any

        import numpy as np
        import torch

        from gatewatch.capture.gate_hooks import HookCall
        from gatewatch.capture.quantity import CaptureContext, Quantity, Reduction, Rows

        KEYWORDS: dict[str, Any] = {"max_gate": True}


        def build(ctx: CaptureContext) -> MaxGate | None:
            return MaxGate(ctx) if ctx.options["max_gate"] and ctx.gates else None


        class MaxGate(Quantity):
            name = "max_gate"

            def __init__(self, ctx: CaptureContext) -> None:
                self.gates = ctx.gates
                self.add_state("max", Reduction.MAX)
                self._open: torch.Tensor | None = None  # [G] largest weight of the open window
                self._closed: list[torch.Tensor | None] = []
                for i, gate in enumerate(self.gates):
                    self.hook_gate(gate, self._seen(i))

            def _seen(self, index: int) -> Any:
                gate = self.gates[index]

                def seen(call: HookCall) -> None:
                    top = call.probs(gate).max().double()
                    if self._open is None:
                        self._open = torch.full((len(self.gates),), -math.inf, dtype=torch.float64, device=top.device)
                    self._open[index] = torch.maximum(self._open[index], top)

                return seen

            def on_window(self, step: int) -> None:
                self._closed.append(self._open)
                self._open = None

            def collect(self, windows: list[int]) -> dict[str, torch.Tensor]:
                closed, self._closed = self._closed[: len(windows)], self._closed[len(windows) :]
                if all(c is None for c in closed):
                    return {}
                empty = torch.full((len(self.gates),), -math.inf, dtype=torch.float64)
                return {"max": torch.stack([empty if c is None else c for c in closed])}

            def rows(self, windows: list[int], host: dict[str, np.ndarray]) -> Rows:
                if "max" not in host:
                    return {}
                return {"max_gate": [
                    {"step": step, "gate": gate.name, "max_weight": value if np.isfinite(value) else math.nan}
                    for step, values in zip(windows, host["max"], strict=True)
                    for gate, value in zip(self.gates, values, strict=True)
                ]}
        ''',
    "toy_quantities/max_gate/read.py": '''
        """The largest gate weight per window, read half."""

        from __future__ import annotations

        from typing import Any

        from gatewatch.declarations import Page, ReadHalf, Section, table_rows
        from gatewatch.rules import Thresholds, fmt, num

        TABLES = {"max_gate": {"step": "int64", "gate": "string", "max_weight": "float64"}}


        def scalars(tables: Any, add: Any) -> None:
            for row in table_rows(tables, "max_gate"):
                add(f"max_gate/{row.gate}", row.max_weight, row.step)


        def last_window(run: Any, th: Thresholds) -> dict[str, Any]:
            table = run.table("max_gate")
            last = table[table["step"] == table["step"].max()]
            return {str(r.gate): num(r.max_weight) for r in last.itertuples()}


        def text(section: dict[str, Any], report: dict[str, Any]) -> list[str]:
            return ["", "largest gate weight: " + ", ".join(f"{g} {fmt(v)}" for g, v in section.items())]


        QUANTITY = ReadHalf(
            tables=TABLES, windowed=("max_gate",), scalars=scalars, sections=(Section("max_gate", last_window, text),),
            pages=(Page("max_gate", "Largest gate weight", ":material/trending_up:", "toy_quantities.max_gate.page",
                        60),),
        )
        ''',
    "toy_quantities/max_gate/page.py": '''
        import plotly.express as px
        import streamlit as st

        from gatewatch.app import ui

        ctx, ref, run, tok = ui.current_run()
        table = run.table("max_gate")
        st.markdown("#### The largest gate weight of each window")
        ui.chart(px.line(table, x="step", y="max_weight", color="gate", title="Largest gate weight per window"),
                 key="max_gate")
        ''',
    "toy_quantities-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: toy-quantities\nVersion: 0.1\n",
    "toy_quantities-0.1.dist-info/entry_points.txt": f"[gatewatch.quantities]\nmax_gate = {PACKAGE}\n",
}
TRAIN = '''
import json, sys
from pathlib import Path

import torch

import gatewatch as gw
from gatewatch.models import MMoE
from gatewatch.sinks.tracker import TrackerSink


class Recorder(TrackerSink):
    """A tracker that keeps what it is sent, and writes it to a file at the end."""

    tracker = "the recorder"

    def __init__(self, path):
        super().__init__("gatewatch/", 1_000_000)
        self.path, self.logged = path, []

    def _start(self):
        pass

    def _send(self):
        while self.pending:
            tag, value, step = self.pending.pop(0)
            self.logged.append([self.prefix + tag, value, step])

    def _log_findings(self, step, findings, changed):
        pass

    def _report(self, report):
        pass

    def _end(self, report):
        Path(self.path).write_text(json.dumps(self.logged))


run, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = MMoE(in_dim=6, n_experts=3, expert_hidden=(), expert_dim=4, tasks=["a", "b"])
seen = {}  # gate -> step -> the largest weight of its outputs (the reference)
recorder = Recorder(out / "tracker.json")
with gw.GateWatch(model, tasks=["a", "b"], log_dir=run, every=2, flush_every=4, flush_secs=None,
                  sinks=[recorder]) as watch:
    assert "max_gate" in [q.name for q in watch.quantities]
    for gate in watch.gates:
        gate.module.register_forward_hook(
            lambda m, i, o, name=gate.name: seen.setdefault(name, {}).__setitem__(watch.ctx.step + 1, o.max().item()))
    for step in range(8):
        out_a, out_b = model(torch.randn(16, 6) * (1 + step))
        watch.backward({"a": out_a.pow(2).mean(), "b": out_b.pow(2).mean()})
        watch.step()
(out / "seen.json").write_text(json.dumps(seen))
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The installed package: its files and its ``dist-info`` with the entry point, in a folder for PYTHONPATH."""
    site = tmp_path_factory.mktemp("site")
    for name, text in FILES.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(textwrap.dedent(text).lstrip())
    return site


def env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


def python(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], env=env(site), capture_output=True, text=True, timeout=300,
                          cwd=site.parent)


@pytest.fixture(scope="module")
def trained(site: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[int, float]], list]:
    """A run written by a training process that has the package: (run dir, the reference maxima, tracker log)."""
    out = tmp_path_factory.mktemp("trained")
    run = out / "runs" / "toy"
    done = python(site, "-c", TRAIN, str(run), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    seen = {g: {int(s): v for s, v in by.items()} for g, by in json.loads((out / "seen.json").read_text()).items()}
    return run, seen, json.loads((out / "tracker.json").read_text())


def window_max(seen: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """The reference: per gate, the largest weight over each window of two steps (numpy over the raw maxima)."""
    return {g: {end: float(np.max([by[end - 1], by[end]])) for end in (2, 4, 6, 8)} for g, by in seen.items()}


@pytest.mark.slow
def test_the_run_directory_and_load_run_hold_it(site: Path, trained) -> None:
    run_dir, seen, _ = trained
    want = window_max(seen)
    assert sorted(want) == ["a", "b"]
    assert list((run_dir / "tables" / "max_gate").glob("*.parquet"))
    script = ("import sys, json, gatewatch as gw, pandas as pd; r = gw.load_run(sys.argv[1]); t = r.table('max_gate'); "
              "print(json.dumps({'string': pd.api.types.is_string_dtype(t['gate']), 'problems': r.problems, "
              "'dtypes': t[['step', 'max_weight']].dtypes.astype(str).to_dict(), 'rows': t.values.tolist()}))")
    done = python(site, "-c", script, str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout)
    assert loaded["dtypes"] == {"step": "int64", "max_weight": "float64"} and loaded["string"]
    assert loaded["problems"] == []
    assert "toy_quantities.max_gate" in json.loads((run_dir / "run.json").read_text())["quantities"]
    got = {(g, s): v for s, g, v in loaded["rows"]}
    assert got == pytest.approx({(g, s): v for g, by in want.items() for s, v in by.items()}, rel=1e-6)


@pytest.mark.slow
def test_gatewatch_report_shows_it_in_json_and_text(site: Path, trained) -> None:
    run_dir, seen, _ = trained
    want = window_max(seen)
    done = python(site, "-m", "gatewatch.cli", "report", str(run_dir), "--json")
    assert done.returncode in (0, 1), done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["max_gate"] == pytest.approx({g: by[8] for g, by in want.items()}, rel=1e-6)
    assert not [p for p in report["problems"] if "max_gate" in p]
    done = python(site, "-m", "gatewatch.cli", "report", str(run_dir))
    assert done.returncode in (0, 1), done.stderr[-3000:]
    assert f"largest gate weight: a {want['a'][8]:.3f}, b {want['b'][8]:.3f}" in done.stdout


@pytest.mark.slow
def test_tensorboard_and_a_tracker_chart_it(trained) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, seen, logged = trained
    want = window_max(seen)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for gate, by in want.items():
        charted = {e.step: e.value for e in events.Scalars(f"max_gate/{gate}")}
        assert charted == pytest.approx(by, rel=1e-6)
        tracked = {step: value for name, value, step in logged if name == f"gatewatch/max_gate/{gate}"}
        assert tracked == pytest.approx(by, rel=1e-6)
    assert "gatewatch/gate/a/entropy" in {name for name, _, _ in logged}  # the built-in scalars are there too


@pytest.mark.slow
def test_without_the_package_the_run_loads_its_table_as_written_with_a_note(trained) -> None:
    run_dir, seen, _ = trained
    run = gw.load_run(run_dir)
    table = run.table("max_gate")
    assert sorted(table.columns) == ["gate", "max_weight", "step"] and len(table) == 8
    assert table.groupby("gate")["max_weight"].max().to_dict() == pytest.approx(
        {g: max(by.values()) for g, by in window_max(seen).items()}, rel=1e-6)
    notes = [p for p in run.problems if "'max_gate'" in p]
    assert len(notes) == 1 and "not declared by any installed quantity" in notes[0]
    report = build_report(run)
    assert "max_gate" not in report and notes[0] in report["problems"]
    assert f"note: {notes[0]}" in render_text(report)
    assert len(run.gates) == 8  # the built-in tables read as ever


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.timeout(600)
def test_its_page_in_a_running_dashboard(site: Path, trained) -> None:
    from test_browser import CHROMIUM, CHROMIUM_ARGS, DRAWN, free_port, settle, stop, wait_healthy

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is needed for the browser test")
    from playwright.sync_api import sync_playwright

    run_dir, _, _ = trained
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatewatch.cli", "dashboard", str(run_dir.parent), "--port", str(port), "--no-browser"],
        env=env(site), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(f"{url}/max_gate?run=toy")
                settle(page, 1)
                assert page.get_by_text("The largest gate weight of each window").count() == 1
                assert page.evaluate(f"() => {DRAWN}") == 1
                assert page.locator('[data-testid="stException"]').count() == 0
                titles = page.evaluate("() => [...document.querySelectorAll('.gtitle')].map(t => t.textContent)")
                assert "Largest gate weight per window" in titles
                assert page.get_by_role("link", name="Largest gate weight").count() >= 1  # in the sidebar
            finally:
                browser.close()
    finally:
        stop(proc)
