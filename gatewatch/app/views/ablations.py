"""Ablations: expert knock-outs, gate-dropout sweeps and training comparisons of the chosen run, drawn by
``gatewatch.app.ablations.render`` (see the page convention in ``gatewatch/app/main.py``)."""

import importlib.util

import streamlit as st

from gatewatch.app import ui

ctx, ref, run, tok = ui.current_run()
if importlib.util.find_spec("gatewatch.app.ablations") is None:
    ui.empty("Ablation results for this run (expert knock-outs, gate-dropout sweeps, training comparisons) "
             "appear here when available.")
    st.stop()

from gatewatch.app.ablations import render  # noqa: E402

render(ref.path, root=ctx.root, selected=[ref.path] + [r.path for r in ctx.selected if r.id != ref.id])
