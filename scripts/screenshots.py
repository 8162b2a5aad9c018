"""Retake the README's dashboard screenshots from a live ``gatewatch demo``: the Overview of the polarizing run
while it trains, once its polarization finding is on screen, and the Runs page with the demo's two runs next to
the sample runs.

    python scripts/screenshots.py [--out docs/img] [--port 8765]

Runs the demo (the dashboard and the two-run story) into a temporary folder and drives Chromium
(``/usr/bin/chromium``, as in the browser tests) with playwright. Writes ``dashboard-overview.png`` and
``dashboard-runs.png`` (1,400 x 1,000).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1400, 1000
DRAWN = ("[...document.querySelectorAll('.js-plotly-plot')]"
         ".filter(e => e.querySelector('.main-svg .cartesianlayer')).length")


def wait_for_finding(root: Path, proc: subprocess.Popen, timeout: float = 300) -> Path:
    """The polarizing run's folder once its summary lists the polarization finding."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the demo ended early (exit {proc.returncode})")
        for summary in root.glob("demo-*/polarizing-mmoe/summary.json"):
            try:
                codes = (json.loads(summary.read_text()).get("findings") or {}).get("counts", {})
            except (OSError, ValueError):
                continue
            if "polarization" in codes:
                return summary.parent
        time.sleep(1.0)
    raise TimeoutError("no polarization finding within the time limit")


def settle(page: Page, charts: int) -> None:
    """Wait for the script run to end, every table to fill and ``charts`` plotly charts to draw."""
    page.wait_for_selector('[data-testid="stMainBlockContainer"] :is(h1, h2, h3)', timeout=90_000)
    if charts:
        page.wait_for_function(f"n => {DRAWN} >= n", arg=charts, timeout=90_000)
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidgetRunningIcon\"], "
        "[data-testid=\"stStatusWidgetRunningManIcon\"]')", timeout=60_000)
    page.wait_for_function(  # data frames draw on a canvas after the script run
        "() => [...document.querySelectorAll('[data-testid=\"stDataFrame\"]')].every(e => e.querySelector('canvas'))",
        timeout=60_000)
    time.sleep(2.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="gatewatch-shots-") as tmp:
        root = Path(tmp) / "runs"
        demo = subprocess.Popen([sys.executable, "-m", "gatewatch.demo", "--out", str(root), "--port",
                                 str(args.port)], cwd=REPO, stdout=subprocess.DEVNULL)
        try:
            run = wait_for_finding(root, demo)
            url = f"http://localhost:{args.port}"
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path="/usr/bin/chromium")
                page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
                page.goto(f"{url}/overview?run={run.relative_to(root).as_posix()}")
                try:
                    settle(page, 0)
                except Exception:
                    page.screenshot(path=str(args.out / "dashboard-overview-failed.png"))
                    raise
                page.get_by_text("Error: polarization").first.wait_for(timeout=60_000)
                page.screenshot(path=str(args.out / "dashboard-overview.png"))
                page.goto(url)
                settle(page, 0)  # the runs table is a canvas: its text is not in the DOM
                page.screenshot(path=str(args.out / "dashboard-runs.png"))
                browser.close()
        finally:
            demo.terminate()
            demo.wait(timeout=60)
    print(f"wrote {args.out / 'dashboard-overview.png'} and {args.out / 'dashboard-runs.png'}")


if __name__ == "__main__":
    main()
