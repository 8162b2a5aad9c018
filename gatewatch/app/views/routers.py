"""Routers: per-layer dispatch of sparse MoE routers - load heatmap at a window, MaxVio over training, bias,
dropped tokens."""

import streamlit as st

from gatewatch import figures
from gatewatch.app import ui

ctx, ref, run, tok = ui.current_run()
routers, experts = run.table("routers"), run.table("router_experts")
if not len(routers[routers["tokens"] > 0]):
    ui.empty("No sparse router in this run. GateWatch finds the routers of transformers MoE models by itself; a "
             "custom router states how it dispatches with gw.Gate(..., router=gw.Router(...)) (docs/guide.md).")
    st.stop()

st.dataframe(figures.router_summary(routers))
step = ui.step_picker(experts["step"], key="router_step", label="Window")
left, right = st.columns(2)
with left:
    ui.chart(figures.load_heatmap(experts, step), key="router_load")
    ui.per_expert_caption(run, "router_experts")
with right:
    ui.chart(figures.max_violation_heatmap(routers), key="router_maxvio_map")
ui.chart(figures.router_curves(routers, "max_violation"), key="router_maxvio")
for value, present, curve in (("bias", "bias_max", "bias_changed"), ("dropped", "dropped", "dropped")):
    if routers[present].notna().any():  # an expert bias; a capacity that drops tokens
        left, right = st.columns(2)
        with left:
            ui.chart(figures.load_heatmap(experts, step, value=value), key=f"router_{value}_map")
        with right:
            ui.chart(figures.router_curves(routers, curve), key=f"router_{curve}")

ui.panels("routers", ctx, run)
