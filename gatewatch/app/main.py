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
* The pages are the dashboard's own (Runs, Overview, Compare, Ablations) and those the registered quantities
  declare (``ReadHalf.pages``, an installed quantity's included), in the order :func:`gatewatch.app.pages.pages`
  gives; a quantity can also add to another's page (``ReadHalf.panels``, drawn by ``ui.panels`` at the page's
  end: the Experts page shows the gates' utilization and the experts' similarity).
* Ablations: the Ablations page (``views/ablations.py``) calls :func:`gatewatch.app.ablations.render` with the
  chosen run (already checked to lie inside the root), the runs root, and the runs chosen on the Runs page
  (chosen run first); it draws with Streamlit into the page body, with figures from
  ``gatewatch.figures.ablation``.
"""

from __future__ import annotations

import os
import sys

import streamlit as st

from gatewatch.app import pages, ui
from gatewatch.app.state import root_from

PAGES = [(page.name, page.title, page.icon) for page in pages.pages()]  # (url path, title, icon), sidebar order


def main() -> None:
    st.set_page_config(page_title="gatewatch", page_icon=":material/call_split:", layout="wide")
    root = root_from(sys.argv[1:], os.environ)
    page = st.navigation([st.Page(pages.script(p), title=p.title, icon=p.icon, url_path=p.name,
                                  default=p.name == "runs") for p in pages.pages()])
    ui.sidebar(root)
    page.run()


if __name__ == "__main__":  # Streamlit runs the entry script as __main__
    main()
