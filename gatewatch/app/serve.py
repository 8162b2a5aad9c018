"""``python -m gatewatch.app.serve run MAIN ...``: Streamlit's own command line, which ``gatewatch dashboard`` runs.

Before handing over to Streamlit it imports the libraries the dashboard's first page run needs (numpy, pandas,
pyarrow), on the main thread: Streamlit's imports (plotly's) look pandas up in ``sys.modules`` and must never find
it half imported. Once Streamlit's runtime is up, a background thread imports the dashboard's own modules, so that
they load while the browser fetches the page, not when the first visitor waits."""

from __future__ import annotations

import importlib
import sys
import threading
import time

LIBRARIES = ("numpy", "pandas", "pyarrow", "pyarrow.parquet")
DASHBOARD = ("gatewatch.app.state", "gatewatch.app.explorer", "gatewatch.app.data", "gatewatch.app.pages",
             "gatewatch.app.ui")  # their st.cache_data functions are made once Streamlit's runtime exists
RUNTIME_WAIT_S = 30.0


def preload() -> threading.Thread:
    """Import the libraries here, then (once Streamlit's runtime is up) the dashboard's modules on a daemon thread.
    A module that fails to import is left to fail where a page uses it, with the page's own message."""
    for name in LIBRARIES:
        _try_import(name)

    def load() -> None:
        from streamlit import runtime

        deadline = time.monotonic() + RUNTIME_WAIT_S
        while not runtime.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if runtime.exists():
            for name in DASHBOARD:
                _try_import(name)

    thread = threading.Thread(target=load, name="gatewatch-preload", daemon=True)
    thread.start()
    return thread


def _try_import(name: str) -> None:
    try:
        importlib.import_module(name)
    except Exception:  # the page that needs it reports the error
        return


def main() -> int:
    """Preload, then run Streamlit's command line on this process's arguments."""
    preload()
    from streamlit.web import cli

    return int(cli.main(prog_name="streamlit") or 0)


if __name__ == "__main__":
    sys.exit(main())
