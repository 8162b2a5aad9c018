"""The Runs page on a folder of many runs, timed in headless Chromium against a real ``gatewatch dashboard``.

Builds two folders of ``--runs`` hard-linked copies of the sample runs (``bench_dashboard.copies``): one where each
run carries the ``summary.json`` a watch writes, one written before summaries (none). For each it starts a fresh
``gatewatch dashboard`` process (cold: nothing imported, nothing cached), opens the Runs page in a new browser page
and records, in the page itself (``performance.now()``: milliseconds since the navigation started, polled every
25 ms, so the benchmark's own process does not delay the figures):

* **table visible**: the runs table is on screen with rows in it - the dataframe's grid (Glide's accessible
  ``table[role=grid]`` inside ``[data-testid=stDataFrame]``) has drawn at least one data row (a ``tbody`` row); the
  rows the table holds then (``aria-rowcount`` less the header) are printed with it;
* **every run in**: the table holds all the runs and no progress bar is left (for old runs: every run read in
  full, its summary written into it);
* **second visit**: a new browser page (a new session: nothing of the first page's session kept) on the same
  server, timed to every run in; then, for the old runs, the same on a fresh server, their summaries now in the
  runs; and once more with the summaries only in the per-user cache (each moved there, as ``gatewatch summarize
  --cache`` keeps them for a read-only folder).

Targets: with summaries, the table visible cold in < 3 s; old runs, the table visible in < 10 s, then filling in;
the second visit < 3 s. A screenshot of the page with every run in goes to ``--shot``.

    python benchmarks/bench_runs_page.py [--runs 1000] [--dir DIR] [--shot runs-page.png] [--fill-timeout 900]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_dashboard import copies  # noqa: E402
from test_browser import CHROMIUM, CHROMIUM_ARGS, WIDTH, free_port, full_page, stop, wait_healthy  # noqa: E402

from gatewatch.run_reader import list_runs  # noqa: E402
from gatewatch.summary import SUMMARY_FILE, read_summary  # noqa: E402
from gatewatch.summary_cache import SUMMARIES_ENV, cache_summary, run_key  # noqa: E402

VISIBLE_S, OLD_VISIBLE_S = 3.0, 10.0
# polled in the page from its first script on: when the table first shows rows, and each change of its row count
WATCH = """
window.__runsPage = {visible: null, visibleRows: null, counts: [], marks: {"page loaded": null, "title drawn": null,
                                                                           "table element": null}};
setInterval(() => {
  const m = window.__runsPage.marks, now = performance.now() / 1000;
  if (m["page loaded"] === null && document.readyState === "complete") m["page loaded"] = now;
  if (m["title drawn"] === null && document.querySelector('[data-testid="stMainBlockContainer"] h1')) {
    m["title drawn"] = now;
  }
  if (m["table element"] === null && document.querySelector('[data-testid="stDataFrame"]')) m["table element"] = now;
  const grid = document.querySelector('[data-testid="stDataFrame"] table[role="grid"]');
  if (!grid) return;
  const rows = Number(grid.getAttribute('aria-rowcount')) - 1, drawn = grid.querySelectorAll('tbody tr').length;
  const w = window.__runsPage, t = performance.now() / 1000;
  if (w.visible === null && drawn > 0) { w.visible = t; w.visibleRows = rows; }
  const progress = !!document.querySelector('[data-testid="stProgress"]');
  const last = w.counts[w.counts.length - 1];
  if (!last || last[1] !== rows || last[2] !== progress) w.counts.push([t, rows, progress]);
}, 25);
"""
ALL_IN = """n => { const c = window.__runsPage.counts, last = c[c.length - 1];
  return !!last && last[1] === n && !last[2] && window.__runsPage.visible !== null; }"""


def cpu_seconds(server_group: int) -> dict[int, tuple[bool, float]]:
    """For each process of the server (its process group) and of the browser (this process's other descendants:
    Chromium and Playwright's driver): whether it is the server's, and the CPU seconds (user + system) it has used so
    far, from Linux's /proc. The work each side does, which the machine's other load does not inflate as it does the
    wall clock."""
    tick, procs = os.sysconf("SC_CLK_TCK"), {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ... utime (12th), stime (13th)
        except OSError:
            continue
        procs[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), (int(fields[11]) + int(fields[12])) / tick)

    def mine(pid: int) -> bool:
        while pid > 1:
            pid = procs[pid][0] if pid in procs else 0
            if pid == os.getpid():
                return True
        return False

    return {pid: (group == server_group, cpu) for pid, (_, group, cpu) in procs.items()
            if group == server_group or mine(pid)}


def cpu_used(before: dict[int, tuple[bool, float]], after: dict[int, tuple[bool, float]]) -> tuple[float, float]:
    """CPU seconds the server and the browser used between two :func:`cpu_seconds` (by the processes alive at the
    end: a process that ended in between is not counted)."""
    used = [0.0, 0.0]
    for pid, (server, cpu) in after.items():
        used[0 if server else 1] += cpu - (before[pid][1] if pid in before else 0.0)
    return used[0], used[1]


@contextmanager
def dashboard(folder: Path, env: dict[str, str]) -> Iterator[tuple[str, float, int]]:
    """A fresh ``gatewatch dashboard`` on ``folder``: its URL, the seconds it took to answer its health check, and
    its process group."""
    port = free_port()
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "gatewatch.cli", "dashboard", str(folder), "--port", str(port),
                               "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server)
        yield url, time.perf_counter() - start, server.pid
    finally:
        stop(server)


def visit(context, server: tuple[str, float, int], runs: int, timeout_s: float, shot: Path | None = None) -> dict:
    """Open the Runs page in a new page of the browser context ``context`` (a new Streamlit session). Returns the
    in-page times: ``visible`` (s), ``visible_rows``, ``all_in`` (s), ``counts`` ([s, rows, progress bar shown] at
    each change) and ``marks`` (page loaded, title drawn, table element); and the CPU seconds the server
    (``server_cpu``) and the browser (``browser_cpu``) spent until every run was in."""
    url, _, group = server
    page = context.new_page()
    before = cpu_seconds(group)
    try:
        page.add_init_script(WATCH)
        page.goto(url)
        try:
            page.wait_for_function(ALL_IN, arg=runs, timeout=timeout_s * 1000, polling=250)
        except Exception:
            got = page.evaluate("() => window.__runsPage")
            raise SystemExit(f"the Runs page did not show all {runs} runs within {timeout_s:g} s: {got}; it shows: "
                             f"{page.inner_text('body')[:1500]}") from None
        got = page.evaluate("() => window.__runsPage")
        server_cpu, browser_cpu = cpu_used(before, cpu_seconds(group))
        if page.locator('[data-testid="stException"]').count():
            raise SystemExit(f"the Runs page raised: {page.locator('[data-testid=stException]').first.inner_text()}")
        if shot is not None:
            full_page(page, shot)
    finally:
        page.close()
    return {"visible": got["visible"], "visible_rows": got["visibleRows"], "all_in": got["counts"][-1][0],
            "counts": got["counts"], "marks": got["marks"], "server_cpu": server_cpu,
            "browser_cpu": browser_cpu}


def verdict(seconds: float, target: float) -> str:
    return f"(target < {target:g} s){'  SLOW' if seconds >= target else ''}"


def show(label: str, v: dict, runs: int, target: float, *, filling: bool = False) -> None:
    print(f"  {label}: table visible at {v['visible']:.2f} s with {v['visible_rows']:,} of {runs:,} rows "
          f"{verdict(v['visible'], target)}; every run in at {v['all_in']:.2f} s")
    print(f"    CPU until then: server {v['server_cpu']:.2f} s, browser {v['browser_cpu']:.2f} s")
    print("    in the page (s): " + ", ".join(f"{k} {t:.2f}" for k, t in v["marks"].items() if t is not None))
    if filling:
        passes = [(t, n) for t, n, _ in v["counts"] if n > 0]
        step = max(1, len(passes) // 8)
        print("    filling in (s: rows): " + ", ".join(f"{t:.0f}: {n:,}" for t, n in passes[::step])
              + f" ... {passes[-1][0]:.0f}: {passes[-1][1]:,} ({len(passes)} redraws; "
              f"{(passes[-1][0] - passes[0][0]) / max(1, passes[-1][1] - passes[0][1]):.3f} s a run)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs in each folder")
    parser.add_argument("--dir", type=Path, help="build the folders here (rebuilt each time); default: a temp dir")
    parser.add_argument("--shot", type=Path, default=Path("runs-page.png"), help="screenshot of the Runs page")
    parser.add_argument("--fill-timeout", type=float, default=900, help="seconds allowed for every old run to be in")
    parser.add_argument("--skip-old", action="store_true", help="only the folder with summaries")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each figure as it comes, also into a pipe
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        root = (args.dir or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        os.environ[SUMMARIES_ENV] = str(root / "summary-cache")  # here and in the servers: not the user's cache
        env = dict(os.environ)
        shutil.rmtree(root / "summary-cache", ignore_errors=True)
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        n = args.runs

        folder = copies(root, n, summaries=True)
        print(f"{n:,} runs with summary.json in {folder}")
        browser_ctx = browser.new_context(viewport={"width": WIDTH, "height": 900})  # nothing in the browser's cache
        with dashboard(folder, env) as server:
            print(f"  fresh server up in {server[1]:.1f} s")
            show("cold", visit(browser_ctx, server, n, 120, args.shot), n, VISIBLE_S)
            show("second visit, same server", visit(browser_ctx, server, n, 120), n, VISIBLE_S)
        print(f"  screenshot: {args.shot}")
        if args.skip_old:
            return

        folder = copies(root, n, summaries=False)
        print(f"\n{n:,} runs written before summaries in {folder} (each read in full once; its summary written "
              f"into it)")
        browser_ctx = browser.new_context(viewport={"width": WIDTH, "height": 900})
        with dashboard(folder, env) as server:
            print(f"  fresh server up in {server[1]:.1f} s")
            show("cold", visit(browser_ctx, server, n, args.fill_timeout), n, OLD_VISIBLE_S, filling=True)
            show("second visit, same server", visit(browser_ctx, server, n, 120), n, VISIBLE_S)
        with dashboard(folder, env) as server:
            show("second visit, fresh server", visit(browser_ctx, server, n, 120), n, VISIBLE_S)

        for run in list_runs(folder):  # as `gatewatch summarize --cache` keeps them, for a read-only folder
            summary = read_summary(run)
            assert summary is not None, f"{run} has no summary.json"
            cache_summary(run, summary, run_key(run))
            (run / SUMMARY_FILE).unlink()
        print(f"\nthe same {n:,} runs, their summaries moved into the per-user cache (as `gatewatch summarize "
              f"--cache` keeps them for a read-only folder)")
        with dashboard(folder, env) as server:
            show("second visit, fresh server", visit(browser_ctx, server, n, 120), n, VISIBLE_S)
        browser.close()


if __name__ == "__main__":
    main()
