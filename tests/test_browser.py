"""The dashboard in a real browser: `gatewatch dashboard` serves real runs, headless Chromium opens every page,
the charts render, no error shows, and full-page screenshots land in $GATEWATCH_ARTIFACTS/screenshots.

Needs Debian's chromium (/usr/bin/chromium) and Python playwright. Without them the test is skipped locally
and fails in CI (when $CI is set), so CI never passes without looking.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from gatewatch.app.pages import pages

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# page -> (query string, charts it must draw): every page of the dashboard and of the registered quantities, as
# they declare it (the Runs page is the default page, at the root URL)
PAGES = {("" if p.name == "runs" else p.name): (p.example, p.charts) for p in pages()}
WIDTH = 1400
DRAWN = ("[...document.querySelectorAll('.js-plotly-plot')]"  # charts whose plot area is drawn
         ".filter(e => e.querySelector('.main-svg .cartesianlayer')).length")
CHARTS = ("() => [...document.querySelectorAll('.js-plotly-plot')].map(e => ({"  # each chart's title, legend
          "title: e.querySelector('.gtitle')?.textContent ?? '', heatmap: !!e.querySelector('.heatmaplayer image'), "
          "legend: [...e.querySelectorAll('.legendtext')].map(t => t.textContent)}))")
SAMPLE_RUNS = Path(__file__).parents[1] / "sample_runs"
SPARSE_RUN = "qwen3-moe-domains"  # a transformers Qwen3-MoE (fused experts) with its checkpoint: the Ablations page
ROWS = ("() => [...document.querySelectorAll('[data-testid=\"stDataFrame\"]')].map(d => [...d.querySelectorAll("
        "'[role=row]')].map(r => [...r.querySelectorAll('[role=gridcell], [role=columnheader]')]"
        ".map(c => c.textContent)))")  # each table's rows as its accessible grid holds them
TEXT_BOXES = ("() => [...document.querySelectorAll('.js-plotly-plot text')].filter(t => t.textContent.trim())"
              ".map(t => { const b = t.getBoundingClientRect(); "
              "return {text: t.textContent, x0: b.left, y0: b.top, x1: b.right, y1: b.bottom}; })")

pytestmark = pytest.mark.browser


def _need(what: str) -> None:
    message = f"{what} is needed for the browser test (.ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def playwright_api():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("Python playwright")
    if not Path(CHROMIUM).exists():
        _need(CHROMIUM)
    with sync_playwright() as p:
        yield p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the dashboard exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the dashboard did not answer on {url}/_stcore/health within {timeout} s")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, standard_run_dirs: dict[str, Path]) -> Iterator[Path]:
    """The standard runs, the sample runs that pages open as their example (``deepseek-routers``: a transformers
    MoE's routers; ``qwen3-moe-domains``: sample groups) and the sparse run the Ablations test knocks an expert out
    of, and ``growing``, a run a background process keeps writing while the test looks."""
    root = tmp_path_factory.mktemp("browser") / "runs"
    shutil.copytree(next(iter(standard_run_dirs.values())).parent, root)
    for name in sorted({parse_qs(query.lstrip("?")).get("run", [""])[0] for query, _ in PAGES.values()} | {SPARSE_RUN}):
        if name and (SAMPLE_RUNS / name).is_dir() and not (root / name).exists():
            shutil.copytree(SAMPLE_RUNS / name, root / name)
    writer = subprocess.Popen([
        sys.executable, "-c",
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); from _runs_factory import train_mmoe; "
        "train_mmoe(Path(sys.argv[2]), steps=1_000_000, flush_every=20, pace=0.05)",
        str(Path(__file__).parent), str(root / "growing"),
    ], start_new_session=True)
    try:
        deadline = time.time() + 60
        while not list((root / "growing" / "tables").glob("gates/*.parquet")) and time.time() < deadline:
            time.sleep(0.5)
        yield root
    finally:
        stop(writer)


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatewatch.cli", "dashboard", str(root), "--port", str(port), "--no-browser"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """End a process started in its own session, and anything it started."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def screenshots() -> Path:
    base = Path(os.environ.get("GATEWATCH_ARTIFACTS") or Path(__file__).parents[1] / "artifacts")
    folder = base / "screenshots"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def settle(page, charts: int) -> None:
    """Wait until the script run is over and ``charts`` plotly charts have drawn their SVG."""
    page.wait_for_selector('[data-testid="stMainBlockContainer"]', timeout=60_000)
    if charts:
        page.wait_for_function(f"n => {DRAWN} >= n", arg=charts, timeout=90_000)
    else:
        page.wait_for_selector('[data-testid="stMainBlockContainer"] h1, [data-testid="stMainBlockContainer"] h3',
                               timeout=60_000)
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidgetRunningIcon\"], "
        "[data-testid=\"stStatusWidgetRunningManIcon\"]')", timeout=60_000)
    time.sleep(1.0)  # let plotly finish its transitions before the screenshot


def full_page(page, path: Path) -> None:
    """Screenshot the whole page: Streamlit scrolls inside its main block, so grow the viewport to fit it."""
    height = page.evaluate(
        "() => Math.max(...['[data-testid=\"stMain\"]', '[data-testid=\"stAppViewContainer\"]']"
        ".map(s => document.querySelector(s)).filter(Boolean).map(e => e.scrollHeight))")
    page.set_viewport_size({"width": WIDTH, "height": int(min(max(height, 900), 12_000))})
    time.sleep(0.8)
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": WIDTH, "height": 900})


@pytest.mark.timeout(600)
def test_every_page_in_chromium(playwright_api, server: str, screenshots: Path) -> None:
    browser = playwright_api.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        page = browser.new_page(viewport={"width": WIDTH, "height": 900})
        problems: list[str] = []
        page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
        for name, (query, charts) in PAGES.items():
            page.goto(f"{server}/{name}{query}")
            try:
                settle(page, charts)
            except Exception:
                page.screenshot(path=str(screenshots / f"{name or 'runs'}-failed.png"), full_page=True)
                raise AssertionError(f"{name} did not settle; it shows: {page.inner_text('body')[:3000]}") from None
            shot = name or "runs"
            full_page(page, screenshots / f"{shot}.png")
            assert page.get_by_text("Page not found").count() == 0, shot
            exceptions = page.locator('[data-testid="stException"]')
            assert exceptions.count() == 0, f"{name}: {exceptions.first.inner_text()[:2000]}"
            assert page.locator('[data-testid="stAlertContentError"]').count() == 0, name
            drawn = page.evaluate(f"() => {DRAWN}")
            assert drawn >= charts, f"{name}: {drawn} charts drawn, expected {charts}"
            if name == "overview":
                assert page.get_by_text("Error: polarization").count() == 1
                page.get_by_text("Show on the Gates page").first.click()  # the finding's link opens its chart
                page.wait_for_url("**/gates?*")
                settle(page, 4)
                assert "gate=like" in page.url
                assert page.get_by_text("Expert share of gate 'like' over training").count() == 1
            if name == "":
                assert page.locator('[data-testid="stDataFrame"]').count() == 1
            if name == "routers":
                assert_routers_drawn(page)
        assert not problems, problems
        assert {f"{n or 'runs'}.png" for n in PAGES} <= {p.name for p in screenshots.iterdir()}
    finally:
        browser.close()


def assert_routers_drawn(page) -> None:
    """The Routers page of the DeepSeek sample run (3 MoE layers): its summary table, the load, MaxVio, bias,
    co-activation and routing-stability heatmaps painted, one line per layer in the MaxVio and bias-changed charts,
    and the saturation curve."""
    assert page.locator('[data-testid="stDataFrame"]').count() == 1  # one row per layer, last window
    assert page.get_by_text("No sparse router in this run").count() == 0
    charts = page.evaluate(CHARTS)
    heatmaps = [c["title"] for c in charts if c["heatmap"]]
    assert len(heatmaps) == 5, charts
    for want in ("Dispatch load per layer and expert, step", "MaxVio per layer over training",
                 "Expert bias per layer and expert, step", "Co-activation P(j | i), backbone.layers.3.mlp.gate, step",
                 "Top-k set unchanged since the previous probe"):
        assert sum(t.startswith(want) for t in heatmaps) == 1, (want, heatmaps)
    lines = {c["title"]: c["legend"] for c in charts if not c["heatmap"]}
    layers = ["layer 1", "layer 2", "layer 3"]
    assert lines == {"MaxVio per layer": layers, "Tokens whose choice the bias changed per layer": layers,
                     "Saturation: top-k set equals the final model's": ["mean over layers", "lowest - highest layer"]
                     }, lines


def steps_shown(page) -> int:
    text = page.get_by_text(re.compile(r"^[\d,]+ steps$")).first.inner_text()
    return int(text.split()[0].replace(",", ""))


@pytest.mark.timeout(300)
def test_live_run_refreshes_by_itself(playwright_api, server: str, screenshots: Path) -> None:
    browser = playwright_api.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        page = browser.new_page(viewport={"width": WIDTH, "height": 900})
        page.goto(f"{server}/gates?run=growing")
        settle(page, 4)
        assert page.get_by_text("Live run: the page refreshes").count() == 1
        first = steps_shown(page)
        page.wait_for_function(  # no reload: the page must pick the new windows up on its own
            "n => [...document.querySelectorAll('p')].some(p => /^[\\d,]+ steps$/.test(p.innerText) "
            "&& parseInt(p.innerText.replace(/,/g, '')) > n)", arg=first, timeout=60_000)
        assert steps_shown(page) > first
        full_page(page, screenshots / "live.png")
    finally:
        browser.close()


def overlapping(boxes: list[dict]) -> list[tuple[str, str]]:
    """Pairs of chart texts whose boxes intersect (by more than a pixel each way)."""
    return [(a["text"], b["text"]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
            if min(a["x1"], b["x1"]) - max(a["x0"], b["x0"]) > 1 and min(a["y1"], b["y1"]) - max(a["y0"], b["y0"]) > 1]


def pick(page, widget: str, label: str, option: str) -> None:
    """Choose ``option`` in the first Streamlit selectbox or multiselect (``widget``) labelled ``label``."""
    box = page.locator(f'[data-testid="{widget}"]').filter(
        has=page.locator('[data-testid="stWidgetLabel"]', has_text=re.compile(f"^{re.escape(label)}$"))).first
    box.locator("input").click()
    page.get_by_role("option", name=option, exact=True).click()
    page.keyboard.press("Escape")


@pytest.mark.timeout(180)
def test_router_knockout_on_the_ablations_page(playwright_api, server: str, root: Path, screenshots: Path,
                                               tmp_path: Path) -> None:
    """Knock one expert out of one router of the sparse sample run from the Ablations page: the page's tables show
    the expert's dispatch load 0 with it knocked out and each metric's change, equal to what ``run_knockout`` (the
    function behind ``gatewatch ablate``) computes on a copy of the same run; the heatmap annotates the harm."""
    from gatewatch.ablation import run_knockout
    from gatewatch.metric_direction import primary_metric

    gate, expert = "backbone.layers.1.mlp.gate", 3
    assert not (root / SPARSE_RUN / "ablations").exists()
    shutil.copytree(SAMPLE_RUNS / SPARSE_RUN, tmp_path / SPARSE_RUN, ignore=shutil.ignore_patterns("ablations"))
    want = run_knockout(tmp_path / SPARSE_RUN, only=[gate], experts=[expert]).set_index(["task", "metric"])
    assert want["load"].iloc[0] > 0.05 and (want["ablated_load"] == 0).all()  # the expert had tokens; then none
    browser = playwright_api.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        page = browser.new_page(viewport={"width": WIDTH, "height": 900})
        problems: list[str] = []
        page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
        page.goto(f"{server}/ablations?run={SPARSE_RUN}")
        settle(page, 0)
        assert page.get_by_text("No expert knock-out results for this run yet.").count() == 1
        pick(page, "stMultiSelect", "Gates", gate)
        pick(page, "stSelectbox", "Experts of each gate", "the experts I choose")
        pick(page, "stMultiSelect", "Experts", str(expert))
        page.get_by_text("1 evaluation of the model on the split").wait_for(timeout=30_000)
        page.get_by_role("button", name="Run expert knock-out").click()
        page.get_by_text("Each knock-out", exact=True).wait_for(timeout=90_000)  # the result, read from the run
        settle(page, 1)
        full_page(page, screenshots / "ablations-router-knockout.png")
        exceptions = page.locator('[data-testid="stException"]')
        assert exceptions.count() == 0, exceptions.first.inner_text()[:2000]
        assert page.locator('[data-testid="stAlertContentError"]').count() == 0
        assert not problems, problems

        tables = {tuple(rows[0]): rows[1:] for rows in page.evaluate(ROWS) if rows}
        header = ("gate", "expert", "load", "load knocked out", "task", "metric", "base", "ablated", "delta")
        assert header in tables, list(tables)
        shown = {(r[4], r[5]): dict(zip(header, r, strict=True)) for r in tables[header]}
        assert set(shown) == set(want.index)
        for key, row in shown.items():
            assert (row["gate"], row["expert"]) == (gate, str(expert))
            assert float(row["load knocked out"]) == 0.0  # no token reaches the knocked-out expert
            for column in ("load", "base", "ablated", "delta"):
                assert float(row[column]) == pytest.approx(want.loc[key, column], rel=1e-6, abs=1e-9), (key, column)
        assert max(abs(float(r["delta"])) for r in shown.values()) > 1e-3  # the knock-out changed the metrics

        charts = page.evaluate(CHARTS)
        assert [c["title"] for c in charts if c["heatmap"]] == [
            "Expert knock-out: harm to each task (red = worse without that expert)"], charts
        texts = [b["text"] for b in page.evaluate(TEXT_BOXES)]
        cells = [float(t) for t in texts if re.fullmatch(r"[+-]\d[\d.e+-]*", t)]  # the annotated harms, 2 digits
        harms = []
        for task in want.index.get_level_values("task").unique():
            metric = primary_metric(want.loc[task].index)
            harms.append(want.loc[(task, metric), "harm"])  # one panel per task, in the order of the tasks
            assert any(t.startswith(f"task {task} - {metric}") for t in texts), texts
        assert cells == pytest.approx(harms, rel=0.05), (cells, harms)
        assert {"expert knocked out", "gate", gate, str(expert)} <= set(texts), texts
        assert not overlapping(page.evaluate(TEXT_BOXES))
    finally:
        browser.close()
