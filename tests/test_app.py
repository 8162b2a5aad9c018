"""The dashboard under Streamlit's AppTest: every page on real runs and on bad input, without an exception."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from _runs_factory import make_bad_roots, train_mmoe
from streamlit.testing.v1 import AppTest

from gatewatch.app import launch, state
from gatewatch.app.main import PAGES
from gatewatch.cli import build_parser

MAIN = Path(state.__file__).with_name("main.py")
PAGE_NAMES = [name for name, _, _ in PAGES]
TIMEOUT = 60
RUNS = ["healthy", "polarized", "one_expert", "one_task", "routers", "cut_off", "corrupt", "live"]


def page_matrix(values: list[str], *, fast_lane: bool = True) -> list:
    """``(page, value)`` parameters for every page and value, most marked slow: the fast lane
    (``-m "not slow"``) keeps each value on one page, in turn (so with at least as many values as pages, every
    page is drawn), or none of them when ``fast_lane`` is False."""
    fast = {(PAGE_NAMES[i % len(PAGE_NAMES)], v) for i, v in enumerate(values)} if fast_lane else set()
    return [pytest.param(page, value, marks=() if (page, value) in fast else pytest.mark.slow)
            for value in values for page in PAGE_NAMES]


@pytest.fixture(scope="session")
def runs(standard_run_dirs: dict[str, Path]) -> dict[str, Path]:
    return standard_run_dirs


@pytest.fixture(scope="session")
def root(standard_run_dirs: dict[str, Path]) -> Path:
    return next(iter(standard_run_dirs.values())).parent


@pytest.fixture(scope="session")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_bad_roots(tmp_path_factory.mktemp("bad_roots"))


def open_app(root: Path, monkeypatch: pytest.MonkeyPatch, page: str = "runs", **query: str) -> AppTest:
    """The app on ``root``, showing ``page`` (query parameters as a link would set them)."""
    monkeypatch.setenv(state.ENV_ROOT, str(root))
    at = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT)
    at.query_params.update(query)
    at.run()
    if page != "runs":
        at.switch_page(f"views/{page}.py").run()
    return at


def texts(at: AppTest) -> str:
    """Everything the page says in words (markdown, captions, alerts, expander labels)."""
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [a.value for a in (*at.info, *at.warning, *at.error, *at.success)]
    parts += [e.label for e in at.expander] + [s.value for s in at.subheader] + [t.value for t in at.title]
    parts += [t.value for t in at.text]
    return "\n".join(str(p) for p in parts)


def charts(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


@pytest.mark.parametrize(("page", "run"), page_matrix(RUNS))
@pytest.mark.slow
def test_every_page_renders_every_run(root: Path, monkeypatch: pytest.MonkeyPatch, page: str, run: str) -> None:
    at = open_app(root, monkeypatch, page, run=run)
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    if page in ("overview", "gates", "experts"):
        assert charts(at) >= 1
    if page in ("overview", "gates", "experts", "conflict", "ablations"):
        assert at.sidebar.selectbox(key="run").value == run


@pytest.mark.parametrize(("page", "which"), page_matrix(["empty", "not_a_run", "missing"]))
@pytest.mark.slow
def test_bad_folders_show_a_message(bad: dict[str, Path], monkeypatch: pytest.MonkeyPatch, page: str,
                                    which: str) -> None:
    folder = bad[which] if which in bad else bad["empty"].parent / "does-not-exist"
    at = open_app(folder, monkeypatch, page)
    no_exception(at)
    said = texts(at)
    assert ("No gatewatch runs" in said) if which != "missing" else ("does not exist" in said)
    assert charts(at) == 0


@pytest.mark.slow
def test_polarization_finding_shows_for_the_polarized_run_only(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    polarized = open_app(root, monkeypatch, "overview", run="polarized")
    said = texts(polarized)
    assert "Error: polarization" in said
    assert "task 'like' (gate 'like') is polarized" in said
    assert "GateDropout(0.1)" in said  # the remedy
    assert "since step 10" in said
    healthy = open_app(root, monkeypatch, "overview", run="healthy")
    assert "polarization" not in texts(healthy)
    assert "No findings" in texts(healthy)


SAMPLE_RUNS = Path(__file__).resolve().parents[1] / "sample_runs"
SAMPLES = sorted(p.name for p in SAMPLE_RUNS.glob("*") if (p / "run.json").is_file())


@pytest.mark.parametrize(("page", "run"), page_matrix(SAMPLES, fast_lane=False))  # fast lane: the test below
def test_every_page_renders_every_sample_run(monkeypatch: pytest.MonkeyPatch, page: str, run: str) -> None:
    at = open_app(SAMPLE_RUNS, monkeypatch, page, run=run)
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    multitask = len(json.loads((SAMPLE_RUNS / run / "run.json").read_text()).get("tasks") or []) > 1
    if page in ("overview", "gates", "experts") or (page == "conflict" and multitask):
        assert charts(at) >= 1


@pytest.mark.slow
def test_sample_runs_show_the_findings_they_were_made_for(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"mmoe-polarized", "mmoe-collapsed", "mmoe-p0.5"} <= set(SAMPLES)
    polarized = texts(open_app(SAMPLE_RUNS, monkeypatch, "overview", run="mmoe-polarized"))
    assert "Error: polarization" in polarized and "task 'income'" in polarized
    collapsed = texts(open_app(SAMPLE_RUNS, monkeypatch, "overview", run="mmoe-collapsed"))
    assert "Error: collapse" in collapsed and "dead" in collapsed
    healthy = texts(open_app(SAMPLE_RUNS, monkeypatch, "overview", run="mmoe-p0.5"))
    assert "polarization" not in healthy and "collapse" not in healthy


@pytest.mark.slow
def test_finding_links_to_its_chart(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_app(root, monkeypatch, "overview", run="polarized")
    links = at.get("page_link")
    assert links, "no link to the chart"
    link = links[0].proto
    assert link.label == "Show on the Gates page"
    assert link.page == "gates"
    assert "gate=like" in link.query_string and "run=polarized" in link.query_string
    gates = open_app(root, monkeypatch, "gates", run="polarized", gate="like")
    assert gates.selectbox(key="gate").value == "like"
    assert "Expert share of gate 'like'" in json.dumps([c.proto.spec for c in gates.get("plotly_chart")])


@pytest.mark.slow
def test_thresholds_in_the_sidebar_change_the_findings(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_app(root, monkeypatch, "overview", run="healthy")
    assert "polarization" not in texts(at)
    at.sidebar.number_input(key="th_collapse_share").set_value(0.2).run()
    no_exception(at)
    assert "is polarized" in texts(at)


def test_runs_page_lists_runs_with_findings(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_app(root, monkeypatch, "runs")
    no_exception(at)
    table = at.dataframe[0].value
    assert set(table["run"]) == {"healthy", "polarized", "one_expert", "one_task", "routers", "cut_off", "corrupt",
                                 "live"}
    row = table.set_index("run")
    assert list(row.loc["polarized", "findings"]) == ["polarization (error)"]
    assert list(row.loc["healthy", "findings"]) == ["healthy"]
    assert row.loc["cut_off", "status"] == "cut off" and row.loc["live", "status"] == "live"
    assert row.loc["routers", "tasks / layers"] == "layers: layer0, layer1"
    # unreadable files are counted by a full read: the corrupt run has a summary, so its row does not read them
    assert pd.isna(row.loc["corrupt", "problems"]) and row.loc["corrupt", "steps"] > 0


def test_choosing_runs_sets_the_run_shown(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_app(root, monkeypatch, "runs")
    at.multiselect(key="selected_widget").set_value(["polarized", "healthy"]).run()
    no_exception(at)
    assert at.sidebar.selectbox(key="run").value == "polarized"
    at.switch_page("views/compare.py").run()
    no_exception(at)
    assert at.multiselect(key="compare_runs").value == ["polarized", "healthy"]
    assert charts(at) >= 3


def test_a_run_folder_can_be_the_root(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_app(runs["polarized"], monkeypatch, "overview")
    no_exception(at)
    assert at.sidebar.selectbox(key="run").value == "."
    assert "is polarized" in texts(at)


def test_cut_off_run_says_so(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_app(root, monkeypatch, "gates", run="cut_off")
    assert re.search(r"This run was cut off at step 60, last heard from \d{4}-\d\d-\d\d \d\d:\d\d:\d\d; showing "
                     "what was written.", texts(at))
    assert charts(at) >= 3


def test_unreadable_files_are_listed(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_app(root, monkeypatch, "overview", run="corrupt")
    said = texts(at)
    assert "2 file(s) could not be read and were skipped" in said
    assert "part-900001.parquet" in said and "part-900002.parquet" in said


@pytest.mark.slow
def test_conflict_page(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_app(root, monkeypatch, "conflict", run="healthy")
    no_exception(at)
    assert charts(at) == 7  # six of exact conflict, then conflict meets routing (one point per expert)
    assert at.selectbox(key="expert_pair").options == ["ctr ~ like"]
    at = open_app(root, monkeypatch, "conflict", run="one_task")
    assert "no conflict data: run with GateWatch(conflict_every=50)" in texts(at)
    assert charts(at) == 0


def test_routers_are_described_by_layers(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_app(root, monkeypatch, "gates", run="routers")
    assert "layers: layer0, layer1" in texts(at)
    assert at.selectbox(key="gate").options == ["layer0 (layer)", "layer1 (layer)"]


@pytest.mark.slow
def test_live_run_offers_refresh(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_app(root, monkeypatch, "overview", run="live")
    assert "Live run: the page refreshes when new windows are written" in texts(at)
    at.sidebar.toggle(key="auto_refresh").set_value(False).run()
    assert "switch on 'Refresh live runs'" in texts(at)


@pytest.mark.slow
def test_live_run_is_read_again_when_it_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = train_mmoe(tmp_path / "growing", steps=40)
    at = open_app(tmp_path, monkeypatch, "overview", run="growing")
    assert "40 steps" in texts(at)
    shutil.rmtree(run)
    train_mmoe(tmp_path / "growing", steps=80)
    at.run()
    assert "80 steps" in texts(at)


@pytest.mark.parametrize("page", [page if page in ("gates", "experts", "conflict") else  # the pages that say so
                                  pytest.param(page, marks=pytest.mark.slow) for page in PAGE_NAMES])
@pytest.mark.slow
def test_run_without_windows_yet(tmp_path: Path, runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                 page: str) -> None:
    """A run that has written run.json but no window yet (training just started)."""
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    meta = json.loads((runs["healthy"] / "run.json").read_text())
    meta.update(status="running", steps=0, pid=os.getpid())
    (fresh / "run.json").write_text(json.dumps(meta))
    at = open_app(tmp_path, monkeypatch, page, run="fresh")
    no_exception(at)
    if page in ("gates", "experts"):
        assert "written yet" in texts(at)
    if page == "conflict":
        assert "no conflict data" in texts(at)


def test_ablations_page_draws_the_ablation_module(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_app(root, monkeypatch, "ablations", run="healthy")
    no_exception(at)
    assert "appear here when available" not in texts(at)
    assert len(at.main.children) > 2  # more than the run header


def test_runs_outside_the_root_are_refused(tmp_path: Path, runs: dict[str, Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    shutil.copytree(runs["healthy"], outside)
    (root / "escape").symlink_to(outside, target_is_directory=True)  # a linked run folder: not listed
    sneaky = root / "sneaky"
    sneaky.mkdir()
    shutil.copy(outside / "run.json", sneaky / "run.json")
    (sneaky / "tables").symlink_to(outside / "tables", target_is_directory=True)  # tables elsewhere: refused
    assert [r.id for r in state.discover(root)] == ["sneaky"]
    at = open_app(root, monkeypatch, "gates", run="../outside")
    no_exception(at)
    assert at.sidebar.selectbox(key="run").value == "sneaky"  # a path in the URL is not a choice
    assert "points outside the dashboard's folder" in texts(at)
    assert charts(at) == 0


def test_no_pages_folder_next_to_the_entry() -> None:
    """A pages/ folder beside main.py puts Streamlit in its pages-folder mode, which bypasses st.navigation."""
    assert not (MAIN.parent / "pages").exists(), "move gatewatch/app/pages/* to gatewatch/app/views/ or the package"


def test_root_choice(tmp_path: Path) -> None:
    assert state.root_from(["--runs", str(tmp_path)], {}) == tmp_path.resolve()
    assert state.root_from([], {state.ENV_ROOT: str(tmp_path)}) == tmp_path.resolve()
    assert state.root_from(["-k", "x"], {}) == state.default_root().resolve()


def test_change_token_follows_writes(runs: dict[str, Path]) -> None:
    path = runs["healthy"]
    before = state.change_token(path)
    assert before == state.change_token(path)
    extra = path / "tables" / "losses" / "part-999999.parquet"
    shutil.copy(next((path / "tables" / "losses").glob("*.parquet")), extra)
    try:
        assert state.change_token(path) != before
    finally:
        extra.unlink()


def test_dashboard_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["dashboard", str(tmp_path), "--port", "8611", "--no-browser"])
    assert args.func is launch.cmd_dashboard
    cmd = launch.streamlit_command(tmp_path, port=8611, address="127.0.0.1", browser=False)
    assert cmd[1:4] == ["-m", "gatewatch.app.serve", "run"] and cmd[4] == str(MAIN)
    assert cmd[cmd.index("--server.port") + 1] == "8611" and cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[-2:] == ["--runs", str(tmp_path)]
    assert cmd[cmd.index("--server.showEmailPrompt") + 1] == "false"  # a first run never waits on a prompt


SERVE_ORDER = """
import sys
import streamlit.web.cli as cli
from gatewatch.app import serve
fresh = [name for name in serve.LIBRARIES if name in sys.modules]
seen = {}
def main(**_):
    seen.update({name: name in sys.modules for name in serve.LIBRARIES})
    seen["whole"] = hasattr(sys.modules["pandas"], "Series")
    return 0
cli.main = main
assert serve.main() == 0
print(fresh, seen)
assert all(seen.values()), seen
"""


def test_serve_imports_the_libraries_before_streamlit_runs() -> None:
    """Streamlit (plotly) looks pandas up in sys.modules while it starts: the libraries are whole by then, imported
    on the main thread, never half imported by the preloading thread."""
    done = subprocess.run([sys.executable, "-c", SERVE_ORDER], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    fresh = done.stdout.split("]")[0]
    assert "'pandas'" not in fresh, "the check needs a process where pandas was not imported yet: " + done.stdout


def test_dashboard_opens_a_browser_only_where_one_can_appear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def headless(**env: str) -> str:
        for name in ("DISPLAY", "WAYLAND_DISPLAY"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        cmd = launch.streamlit_command(tmp_path, port=8611, address="127.0.0.1", browser=True)
        return cmd[cmd.index("--server.headless") + 1]

    monkeypatch.setattr(launch.sys, "platform", "linux")
    assert headless() == "true"  # a server without a screen: serve, print the address
    assert headless(DISPLAY=":0") == "false"  # a desktop: Streamlit opens the browser


def test_dashboard_command_rejects_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = build_parser().parse_args(["dashboard", str(tmp_path / "nope")])
    assert launch.cmd_dashboard(missing) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_thin_entry_runs_the_package_app(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = Path(__file__).parents[1] / "app" / "dashboard.py"
    monkeypatch.setenv(state.ENV_ROOT, str(root))
    at = AppTest.from_file(str(entry), default_timeout=TIMEOUT)
    at.query_params["run"] = "polarized"
    at.run()
    no_exception(at)
    at.switch_page("../gatewatch/app/views/overview.py").run()
    no_exception(at)
    assert "is polarized" in texts(at)


@pytest.mark.slow
def test_installed_package_serves_the_app(tmp_path: Path, root: Path) -> None:
    """A plain (non-editable) install holds the app and its pages, and the installed copy renders.

    The wheel is built from a copy of what the build reads (pyproject.toml, README.md, LICENSE, the package), so
    the build leaves no ``build/`` or ``*.egg-info`` in the checkout. It declares its licence as an SPDX string."""
    repo = Path(__file__).parents[1]
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(repo / name, source / name)
    shutil.copytree(repo / "gatewatch", source / "gatewatch", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), str(source)], check=True, capture_output=True)
    wheel = next(wheel_dir.glob("gatewatch-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for page, _, _ in PAGES:
        assert f"gatewatch/app/views/{page}.py" in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata.splitlines() and any(n.endswith("licenses/LICENSE") for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import gatewatch, gatewatch.app.launch as launch\n"
        "from streamlit.testing.v1 import AppTest\n"
        "assert gatewatch.__file__.startswith(sys.argv[1]), gatewatch.__file__\n"
        "assert str(launch.MAIN).startswith(sys.argv[1])\n"
        "at = AppTest.from_file(str(launch.MAIN), default_timeout=60)\n"
        "at.query_params['run'] = 'polarized'\n"
        "at.run(); at.switch_page('views/overview.py').run()\n"
        "assert not at.exception, [e.value for e in at.exception]\n"
        "print('polarized' in ' '.join(m.value for m in at.markdown))\n"
    )
    env = {**os.environ, state.ENV_ROOT: str(root)}
    out = subprocess.run([sys.executable, "-c", script, str(target)], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("True")


def test_groups_page_of_the_sparse_sample_draws_its_domains(monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_app(SAMPLE_RUNS, monkeypatch, "groups", run="qwen3-moe-domains")
    no_exception(at)
    assert "Groups: d0, d1, d2" in texts(at)
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert len(specs) == 4  # specialisation heatmap and lines, the share and load heatmaps of one gate
    heatmaps = [s for s in specs if s["data"] and s["data"][0]["type"] == "heatmap"]
    assert len(heatmaps) == 3 and all(len(h["data"][0]["z"]) > 0 for h in heatmaps)


def test_experts_page_of_the_sparse_sample_shows_its_fused_experts_similarity(monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_app(SAMPLE_RUNS, monkeypatch, "experts", run="qwen3-moe-domains")
    no_exception(at)
    assert "Do the experts learn different things?" in texts(at)
    assert charts(at) == 3  # the routers' load, the CKA matrix and its trend
    assert at.selectbox(key="similarity_pool").options == ["backbone.layers.0.mlp.experts",
                                                           "backbone.layers.1.mlp.experts"]
