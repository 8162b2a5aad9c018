"""Conflict: gradient cosine per task pair over training (all shared parameters, per module, per parameter), the
parameters where the tasks fight most (Recon-style count), the sign-conflict share and GradDrop's sign purity."""

import streamlit as st

from gatewatch import figures
from gatewatch.app import ui

ctx, ref, run, tok = ui.current_run()
conflict = run.tables.get("conflict")
if conflict is None or not len(conflict.dropna(subset=["cosine"])):
    ui.empty(figures.NO_CONFLICT)
    st.stop()

ui.chart(figures.cosine_over_time(conflict, scope="all"), key="cosine_all")
ui.chart(figures.sign_conflict_over_time(conflict), key="sign")

st.markdown("#### One task pair")
pairs = figures.pairs(conflict)
pair = st.selectbox("Task pair", pairs, key="pair")
ui.chart(figures.cosine_over_time(conflict, scope="module", pair=pair), key="cosine_module")
ui.chart(figures.cosine_heatmap(conflict, pair), key="heatmap")
ui.chart(figures.conflict_ranking(conflict, pair=pair), key="ranking")
with st.expander("Conflict counts per parameter (table)"):
    st.dataframe(figures.conflict_counts(conflict, pair=pair), hide_index=True)

purity = run.tables.get("purity")
if purity is not None and len(purity):
    st.markdown("#### All tasks together")
    step = ui.step_picker(purity["step"], key="purity_step", label="Conflict step")
    ui.chart(figures.purity_distribution(purity, step, scope="module"), key="purity")
