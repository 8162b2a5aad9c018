"""Gates: per gate the expert share over training, entropy / polarization / top weight / drift, and at a chosen
step the distribution of gate weights and the task x expert matrix."""

import streamlit as st

from gatewatch import figures
from gatewatch.app import ui

ctx, ref, run, tok = ui.current_run()
if not len(run.shares):
    ui.empty("No gate windows written yet: the first window appears after `every` steps and a flush.")
    st.stop()

left, right = st.columns([3, 2], vertical_alignment="bottom")
with left:
    gate = ui.gate_picker(run)
with right:
    view = st.segmented_control("Show as", ["stacked area", "heatmap"], default="stacked area", key="share_view",
                                required=True)
if view == "heatmap":
    ui.chart(figures.share_heatmap(run.shares, gate), key="share")
else:
    ui.chart(figures.share_area(run.shares, gate), key="share")
ui.per_expert_caption(run, "shares")

threshold = float((run.meta.get("config") or {}).get("threshold", 0.9))
ui.chart(figures.gate_curves(run.gates, threshold=threshold), key="curves")

st.markdown("#### At one step")
step = ui.step_picker(run.shares["step"], key="gate_step")
left, right = st.columns(2)
with left:
    ui.chart(figures.task_expert_matrix(run.shares, step, gates=run.gates), key="matrix")
with right:
    ui.chart(figures.weight_histogram(run.hist, step), key="hist")

ui.panels("gates", ctx, run)
