"""How fast the dashboard draws a long run: 100,000 steps, a window every 10 (4 tasks x 8 experts), conflict every
50 steps on 20 parameter tensors (6 task pairs) - about 1.3 million table rows.

Builds the run once (written straight into its tables, no training; a second run of the same size for the
Compare page), then prints:

* reading: ``load_run``, findings, report;
* every figure of every page: build time and JSON serialisation (what Streamlit sends to the browser);
* every page end to end under Streamlit's AppTest: the first (cold) render, and the median of ``--repeat``
  later (warm) renders, when the run is cached and only the figures are drawn again.

Target: every page under 2 s warm.

Then a folder of ``--runs`` runs (default 1,000: hard-linked copies of the sample runs, each with the
``summary.json`` a watch writes) and the Runs page's first (cold) render on it under a fresh AppTest. Target: the
cold Runs page within 3 s.

Then a folder of ``--old-runs`` runs written before summaries (default: as many; hard-linked copies of the sample
runs without ``summary.json``), timed through the functions behind the Runs page, as it runs them: the first pass
(every run waits), the first reads within the page's time budget and the table they give, then the rest filled in
one budget at a time (each run's summary written into it), and a second visit (every summary kept, nothing read in
full), also under a fresh AppTest. The same once more with the summaries in the per-user cache (``gatewatch
summarize --cache``: a read-only folder). Targets: the table visible within 10 s, the second visit within 3 s.

    python benchmarks/bench_dashboard.py [--steps 100000] [--repeat 3] [--dir DIR] [--runs 1000] [--old-runs N]
                                         [--runs-only]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from _runs_factory import write_synthetic_run  # noqa: E402

import gatewatch as gw  # noqa: E402
from gatewatch import figures  # noqa: E402
from gatewatch.app import state  # noqa: E402
from gatewatch.app.main import PAGES  # noqa: E402

TARGET_S = 2.0
RUNS_TARGET_S = 3.0
SAMPLE_RUNS = REPO / "sample_runs"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def build(root: Path, steps: int) -> list[Path]:
    paths = [root / "long_a", root / "long_b"]
    for seed, path in enumerate(paths):
        if not (path / "run.json").exists():
            seconds, _ = timed(lambda p=path, s=seed: write_synthetic_run(p, steps=steps, seed=s))
            print(f"wrote {path.name}: {seconds:.1f} s")
    return paths


def figure_times(run: gw.Run, other: gw.Run) -> dict[str, list[tuple[str, float, float]]]:
    """Each page's figures on the long run: (figure, build s, JSON s)."""
    conflict, purity = run.table("conflict"), run.table("purity")
    gate, pair = run.gate_names[0], figures.pairs(conflict)[0]
    both = {"a": run, "b": other}
    pages: dict[str, dict[str, Callable[[], object]]] = {
        "overview": {"loss_curves": lambda: figures.loss_curves({run.name: run.losses})},
        "gates": {
            "share_area": lambda: figures.share_area(run.shares, gate),
            "share_heatmap": lambda: figures.share_heatmap(run.shares, gate),
            "gate_curves": lambda: figures.gate_curves(run.gates),
            "task_expert_matrix": lambda: figures.task_expert_matrix(run.shares, gates=run.gates),
            "weight_histogram": lambda: figures.weight_histogram(run.hist),
        },
        "experts": {
            "utilization_over_time": lambda: figures.utilization_over_time(run.experts),
            "load_balance": lambda: figures.load_balance(run.experts),
            "utilization_at_step": lambda: figures.utilization_at_step(run.experts),
            "utilization_by_task": lambda: figures.utilization_by_task(run.shares, gates=run.gates),
        },
        "conflict": {
            "cosine_over_time(all)": lambda: figures.cosine_over_time(conflict),
            "sign_conflict_over_time": lambda: figures.sign_conflict_over_time(conflict),
            "cosine_over_time(module)": lambda: figures.cosine_over_time(conflict, scope="module", pair=pair),
            "cosine_heatmap": lambda: figures.cosine_heatmap(conflict, pair),
            "conflict_ranking": lambda: figures.conflict_ranking(conflict, pair=pair),
            "purity_distribution": lambda: figures.purity_distribution(purity, scope="module"),
        },
        "compare": {
            "compare_gate_metric": lambda: figures.compare_gate_metric({k: r.gates for k, r in both.items()}),
            "compare_load_balance": lambda: figures.compare_load_balance({k: r.experts for k, r in both.items()}),
            "loss_curves": lambda: figures.loss_curves({k: r.losses for k, r in both.items()}),
            "compare_conflict": lambda: figures.compare_conflict({k: r.table("conflict") for k, r in both.items()}),
        },
    }
    figures.no_data("warm-up", "plotly loads its validators on the first figure")
    out: dict[str, list[tuple[str, float, float]]] = {}
    for page, figs in pages.items():
        out[page] = []
        for name, make in figs.items():
            build_s, fig = timed(make)
            json_s, _ = timed(fig.to_json)  # type: ignore[attr-defined]
            out[page].append((name, build_s, json_s))
    return out


def page_times(root: Path, run_id: str, repeat: int) -> dict[str, tuple[float, float]]:
    """Each page under AppTest: (cold s, median warm s)."""
    from streamlit.testing.v1 import AppTest

    os.environ[state.ENV_ROOT] = str(root)
    at = AppTest.from_file(str(Path(state.__file__).with_name("main.py")), default_timeout=600)
    at.query_params.update({"run": run_id, "compare_runs": ["long_a", "long_b"]})
    out = {}
    for name, _, _ in PAGES:
        if name != "runs":
            at.switch_page(f"views/{name}.py")
        cold, _ = timed(at.run)
        if at.exception:
            raise SystemExit(f"page {name} raised: {at.exception[0].value}")
        warm = [timed(at.run)[0] for _ in range(repeat)]
        out[name] = (cold, statistics.median(warm))
    return out


def copies(root: Path, n: int, *, summaries: bool) -> Path:
    """``root/many`` (``summaries``: each with the summary.json a watch writes) or ``root/old`` (none): ``n``
    copies of the sample runs, their table files hard-linked."""
    import shutil

    from gatewatch.run_format import atomic_write_json
    from gatewatch.summary import SUMMARY_FILE, summary_from_run

    folder = root / ("many" if summaries else "old")
    shutil.rmtree(folder, ignore_errors=True)
    sources = []
    for src in sorted(p for p in SAMPLE_RUNS.iterdir() if (p / "run.json").is_file()):
        dst = root / "sources" / src.name
        if not dst.exists():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint.pt", "ablations", SUMMARY_FILE))
        sources.append(dst)
    written = {src: summary_from_run(run, gw.find(run)) for src in sources if summaries for run in [gw.load_run(src)]}
    for i in range(n):
        src = sources[i % len(sources)]
        copy = folder / f"{src.name}-{i:04d}"
        shutil.copytree(src, copy, copy_function=os.link)
        if summaries:
            atomic_write_json(copy / SUMMARY_FILE, written[src])
    return folder


def runs_page_cold(folder: Path) -> float:
    """The Runs page's first render on ``folder`` under a fresh AppTest (empty caches), every run shown."""
    from streamlit.testing.v1 import AppTest

    os.environ[state.ENV_ROOT] = str(folder)
    at = AppTest.from_file(str(Path(state.__file__).with_name("main.py")), default_timeout=600)
    seconds, _ = timed(at.run)
    if at.exception:
        raise SystemExit(f"the Runs page raised: {at.exception[0].value}")
    shown = at.dataframe[0].value
    if len(shown) != len(state.discover(folder)):
        raise SystemExit(f"the Runs page shows {len(shown)} runs of {len(state.discover(folder))}")
    return seconds


def page_pass(folder: Path, refs: list[state.RunRef], reads: dict) -> state.RunsTable:
    """One pass of the Runs page over its runs: the kept summaries, and the runs waiting to be read in full."""
    from gatewatch.app import data

    return state.runs_table(refs, lambda ref: data.kept_row(folder, ref, reads))


def fill_in(folder: Path) -> None:
    """The Runs page on a folder of runs without summaries, pass by pass, as the page reruns."""
    from gatewatch.app import data

    start = time.perf_counter()
    refs = state.discover(folder)
    reads: dict = {}
    first = page_pass(folder, refs, reads)
    drawn = time.perf_counter() - start
    visible, passes, listing = None, 1, drawn
    while first.pending:
        state.read_within(first.pending, lambda ref: data.read_in_full(folder, ref, reads),
                          state.read_budget(len(first.rows)))
        seconds, first = timed(lambda: page_pass(folder, refs, reads))
        passes, listing = passes + 1, listing + seconds
        if visible is None:
            visible = (time.perf_counter() - start, len(first.rows))
    total = time.perf_counter() - start
    if first.unreadable or len(first.rows) != len(refs):
        raise SystemExit(f"{len(first.rows)} rows of {len(refs)}: {first.unreadable[:3]}")
    print(f"  first pass (page drawn, {len(refs):,} runs waiting): {drawn:.2f} s")
    if visible is not None:
        print(f"  table visible with its first {visible[1]} runs: {visible[0]:.2f} s (target < 10 s)"
              f"{'  SLOW' if visible[0] >= 10 else ''}")
    print(f"  every run in: {total:.1f} s over {passes} passes: {(total - listing) / len(refs):.3f} s per run read, "
          f"{listing:.1f} s listing the rows")


def second_visit(folder: Path) -> None:
    refs = state.discover(folder)
    seconds, table = timed(lambda: page_pass(folder, refs, {}))
    assert not table.pending and len(table.rows) == len(refs)  # type: ignore[attr-defined]
    app = runs_page_cold(folder)
    print(f"  second visit: {seconds:.2f} s for the table's rows; the Runs page under a fresh AppTest {app:.2f} s "
          f"(target < {RUNS_TARGET_S:g} s){'  SLOW' if max(seconds, app) >= RUNS_TARGET_S else ''}")


def runs_folder(root: Path, n: int, old: int) -> None:
    if n:
        seconds, folder = timed(lambda: copies(root, n, summaries=True))
        print(f"\n{n:,} runs in {folder} (hard-linked copies of the sample runs, with summaries): built in "
              f"{seconds:.1f} s")
        cold = runs_page_cold(folder)
        print(f"  Runs page, cold (fresh AppTest, empty caches): {cold:.2f} s for {n:,} runs "
              f"(target < {RUNS_TARGET_S:g} s){'  SLOW' if cold >= RUNS_TARGET_S else ''}")
    if not old:
        return
    from gatewatch import summary_cache

    folder = copies(root, old, summaries=False)
    print(f"\n{old:,} runs written before summaries in {folder} (hard-linked copies of the sample runs), read "
          f"{state.READ_BUDGET_S:g} s per pass ({state.FIRST_READ_S:g} s the first); each summary written into its run")
    fill_in(folder)
    second_visit(folder)
    import shutil

    folder = copies(root, old, summaries=False)
    os.environ[summary_cache.SUMMARIES_ENV] = str(root / "summary-cache")
    shutil.rmtree(summary_cache.cache_dir(), ignore_errors=True)
    writable = summary_cache.can_write_into
    summary_cache.can_write_into = lambda path: False  # a read-only folder: every summary goes to the cache
    try:
        print(f"\nthe same, read-only: each summary in the cache ({summary_cache.cache_dir()})")
        fill_in(folder)
        second_visit(folder)
    finally:
        summary_cache.can_write_into = writable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3, help="warm renders per page (the median is printed)")
    parser.add_argument("--dir", type=Path, help="keep the runs here (reused when present); default: a temp dir")
    parser.add_argument("--runs", type=int, default=1000, help="runs in the folder for the Runs page (0: skip)")
    parser.add_argument("--old-runs", type=int, help="runs without summaries for the Runs page (default: --runs)")
    parser.add_argument("--runs-only", action="store_true", help="only the folder of many runs")
    args = parser.parse_args()
    del sys.argv[1:]  # the dashboard under AppTest reads its root from --runs on the command line, else $GATEWATCH_RUNS
    with tempfile.TemporaryDirectory() as tmp:
        root = (args.dir or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        runs_folder(root, args.runs, args.runs if args.old_runs is None else args.old_runs)
        if args.runs_only:
            return
        paths = build(root, args.steps)
        load_s, run = timed(lambda: gw.load_run(paths[0]))
        rows = {name: len(df) for name, df in run.tables.items() if len(df)}
        sizes = ", ".join(f"{k} {v:,}" for k, v in rows.items())
        print(f"\nrun: {run.steps:,} steps, {sum(rows.values()):,} rows ({sizes})")
        find_s, found = timed(lambda: gw.find(run))
        report_s, _ = timed(lambda: gw.build_report(run, findings=found))
        print(f"load_run {load_s:.2f} s   findings {find_s:.2f} s ({len(found)})   report {report_s:.2f} s")

        print("\nfigures (build + JSON, s)")
        other = gw.load_run(paths[1])
        for page, figs in figure_times(run, other).items():
            total = sum(b + j for _, b, j in figs)
            print(f"  {page:<9} {total:6.2f}")
            for name, b, j in figs:
                print(f"      {name:<26} {b:6.3f} + {j:.3f}")

        print(f"\npages under AppTest (s; target < {TARGET_S:g} warm)")
        print(f"  {'page':<10} {'cold':>6} {'warm':>6}")
        slow = []
        for name, (cold, warm) in page_times(root, paths[0].name, args.repeat).items():
            print(f"  {name:<10} {cold:6.2f} {warm:6.2f}{'  SLOW' if warm >= TARGET_S else ''}")
            if warm >= TARGET_S:
                slow.append(name)
        print("\nall pages under target" if not slow else f"\nover target: {', '.join(slow)}")


if __name__ == "__main__":
    main()
