"""The Routers page of a 48-layer x 128-expert run on first load, timed in Chromium.

Serves the folder holding the run with ``gatewatch dashboard`` (a fresh server: nothing cached), opens
``/routers?run=<run>`` in headless Chromium and times until every chart is drawn (Plotly's SVG in place and
Streamlit's script run over). A full-page screenshot goes to ``--shot``. Build the run first with
``python benchmarks/bench_wide_run.py`` (it caches it under /tmp/gatewatch-wide/wide). Target: under 10 s.

    python benchmarks/bench_routers_page.py [--run /tmp/gatewatch-wide/wide] [--charts 6]
        [--shot artifacts/screenshots/routers-48x128.png]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_browser import CHROMIUM, CHROMIUM_ARGS, WIDTH, free_port, full_page, settle, stop, wait_healthy  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("/tmp/gatewatch-wide/wide"))
    p.add_argument("--charts", type=int, default=6, help="charts the page must draw (6 for a router without bias)")
    p.add_argument("--shot", type=Path, default=Path("artifacts/screenshots/routers-48x128.png"))
    args = p.parse_args()
    args.shot.parent.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "gatewatch.cli", "dashboard", str(args.run.parent), "--port",
                               str(port), "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": WIDTH, "height": 900})
            start = time.perf_counter()
            page.goto(f"{url}/routers?run={args.run.name}")
            settle(page, args.charts)
            seconds = time.perf_counter() - start - 1.0  # settle() waits 1 s for Plotly's transitions at the end
            errors = page.locator('[data-testid="stException"]').count()
            full_page(page, args.shot)
            browser.close()
        print(f"Routers page of {args.run.name}, first load: {seconds:.1f} s to {args.charts} drawn charts "
              f"({errors} exceptions); screenshot {args.shot}")
    finally:
        stop(server)


if __name__ == "__main__":
    main()
