"""Conflict: gradient cosine per task pair over training (all shared parameters, per module, per parameter), the
parameters where the tasks fight most (Recon-style count), the sign-conflict share, GradDrop's sign purity, and
conflict meets routing: each expert's cosine against how much both tasks use it (exact, or the proxy)."""

import streamlit as st

from gatewatch import figures
from gatewatch.app import ui
from gatewatch.figures.conflict import pair_label
from gatewatch.quantities.conflict.read import conflict_threshold, contested_floor, expert_table, scope_caption

ctx, ref, run, tok = ui.current_run()
conflict = run.tables.get("conflict")
experts = expert_table(run)
exact = conflict is not None and bool(len(conflict.dropna(subset=["cosine"])))
if not exact and not len(experts):
    ui.empty(figures.NO_CONFLICT)
    st.stop()

if caption := scope_caption(run):
    st.caption(caption)
if exact:
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

st.markdown("#### Conflict meets routing: do the tasks that fight share experts?")
if len(experts):
    expert_pairs = list(dict.fromkeys(pair_label(a, b) for a, b in
                                      experts[["task_a", "task_b"]].itertuples(index=False)))
    expert_pair = st.selectbox("Task pair", expert_pairs, key="expert_pair")
    modes = list(dict.fromkeys(experts["mode"]))
    mode = st.radio("Measured by", modes, horizontal=True, key="expert_mode") if len(modes) > 1 else modes[0]
    floor = contested_floor(ctx.thresholds, int(experts["experts"].max()))
    ui.chart(figures.expert_conflict_map(experts, expert_pair, contested_share=floor,
                                         threshold=conflict_threshold(run), mode=mode), key="expert_conflict")
else:
    st.caption("No gate column maps to a measured expert module (see docs/conflict.md, 'Conflict meets routing').")

ui.panels("conflict", ctx, run)
