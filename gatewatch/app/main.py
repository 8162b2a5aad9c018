"""The gatewatch dashboard: ``streamlit run gatewatch/app/main.py -- --runs RUNS_DIR`` (or ``gatewatch dashboard``).

Page convention
---------------
* This entry script draws the sidebar (run, finding thresholds, live refresh), stores a
  :class:`gatewatch.app.ui.Context` for the page, and routes with ``st.navigation`` to the page scripts in
  ``gatewatch/app/views/``. Pages are thin: they read ``ctx, ref, run, tok = ui.current_run()`` (or
  ``ui.context()``), pick inputs with the helpers in :mod:`gatewatch.app.ui`, and draw figures from
  :mod:`gatewatch.figures` with ``ui.chart(fig, key)``; no figure is built inside a page.
* The runs root is fixed here (``--runs DIR``, else ``$GATEWATCH_RUNS``, else ``sample_runs/`` of a checkout or
  ``./runs``). Runs are chosen only among :func:`gatewatch.app.state.discover` results; every path is checked
  to resolve inside the root before it is read.
* The page scripts live in ``views/``, not ``pages/``: a ``pages/`` folder next to this script switches
  Streamlit into its older pages-folder mode, which bypasses ``st.navigation`` (and this sidebar).
* Ablations: the Ablations page (``views/ablations.py``) imports :mod:`gatewatch.app.ablations` when it exists
  and calls ``render(run_path: Path, *, root: Path, selected: Sequence[Path]) -> None`` with the chosen run
  (already checked to lie inside the root), the runs root, and the runs chosen on the Runs page (chosen run
  first). ``render`` draws with Streamlit into the page body; its figures come from
  ``gatewatch.figures.ablation``. Until that module exists the page says that ablation results appear there.
"""

from __future__ import annotations

import os
import sys

import streamlit as st

from gatewatch.app import ui
from gatewatch.app.state import root_from

PAGES = [  # (script name in views/, title, icon)
    ("runs", "Runs", ":material/folder_open:"),
    ("overview", "Overview", ":material/summarize:"),
    ("gates", "Gates", ":material/call_split:"),
    ("experts", "Experts", ":material/groups:"),
    ("routers", "Routers", ":material/alt_route:"),
    ("conflict", "Conflict", ":material/compare_arrows:"),
    ("compare", "Compare", ":material/stacked_line_chart:"),
    ("ablations", "Ablations", ":material/science:"),
]


def main() -> None:
    st.set_page_config(page_title="gatewatch", page_icon=":material/call_split:", layout="wide")
    root = root_from(sys.argv[1:], os.environ)
    pages = [st.Page(ui.page_file(name), title=title, icon=icon, url_path=name, default=name == "runs")
             for name, title, icon in PAGES]
    page = st.navigation(pages)
    ui.sidebar(root)
    page.run()


if __name__ == "__main__":  # Streamlit runs the entry script as __main__
    main()
