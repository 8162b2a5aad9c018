"""Experts: utilization of each expert across tasks over training, dead experts, load balance."""

import streamlit as st

from gatewatch import figures
from gatewatch.app import ui

ctx, ref, run, tok = ui.current_run()
if not len(run.experts.dropna(subset=["utilization"])):
    if len(run.table("router_experts")):  # sparse routers: each layer owns its experts (the Routers page)
        ui.empty("The experts of sparse routers belong to their layer: their load per layer is on the Routers page.")
        ui.chart(figures.load_heatmap(run.table("router_experts")), key="router_load")
        ui.per_expert_caption(run, "router_experts")
        ui.panels("experts", ctx, run)  # e.g. the similarity of the fused experts of each layer
        st.stop()
    ui.empty("No expert utilization written yet: the first window appears after `every` steps and a flush.")
    st.stop()

dead_fraction = ctx.thresholds.dead_fraction
dead = figures.dead_experts(run.experts, dead_fraction)
if dead:
    st.markdown(f"**Dead experts** (below {dead_fraction:g} of an even split in the last window): "
                + ", ".join(f"expert {d}" for d in dead))
ui.chart(figures.utilization_over_time(run.experts, dead_fraction=dead_fraction), key="utilization")
ui.chart(figures.load_balance(run.experts, dead_fraction=dead_fraction), key="balance")

st.markdown("#### At one step")
step = ui.step_picker(run.experts["step"], key="expert_step")
left, right = st.columns(2)
with left:
    ui.chart(figures.utilization_at_step(run.experts, step, dead_fraction=dead_fraction), key="util_step")
with right:
    ui.chart(figures.utilization_by_task(run.shares, step, gates=run.gates), key="by_task")

ui.panels("experts", ctx, run)
