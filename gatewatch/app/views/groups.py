"""Groups: where each sample group's rows go on a shared gate (group x expert heatmap of one gate, with a window
slider) and how far the gates specialise by group over training (per layer, against the shuffled-label
baseline)."""

import streamlit as st

from gatewatch import figures
from gatewatch.app import ui

ctx, ref, run, tok = ui.current_run()
routing, spec = run.table("group_routing"), run.table("group_specialisation")
if not len(routing):
    ui.empty("No sample groups in this run. Name them with GateWatch(..., sample_groups=['code', 'maths', 'chat']) "
             "and label each batch with `with watch.grouped(labels): out = model(x)` (docs/guide.md).")
    st.stop()

st.caption(f"Groups: {', '.join(run.meta.get('sample_groups') or sorted(routing['group'].unique()))}. "
           "Specialisation I(G;E)/H(G): 0 when every group spreads over the experts alike, 1 when the expert "
           "reveals the group; the baseline is its value for labels unrelated to the routing.")
many = spec["gate"].nunique() > 8
if spec["gate"].nunique() > 1:
    ui.chart(figures.specialisation_heatmap(spec), key="group_spec_map")
if not many:
    ui.chart(figures.specialisation_curves(spec), key="group_spec_lines")

st.markdown("#### One gate at one window")
gate = ui.gate_picker(run)
steps = figures.group_detail_steps(routing, gate)
if not steps:
    ui.empty(f"No window of {gate!r} keeps the per-expert lists yet (group_experts_every; the run's last window "
             "always does).")
    st.stop()
step = ui.step_picker(routing.loc[routing["step"].isin(steps), "step"], key="group_step", label="Window")
values = ["share", "load"] if routing.loc[routing["gate"] == gate, "load"].notna().any() else ["share"]
columns = st.columns(len(values))
for column, value in zip(columns, values, strict=True):
    with column:
        ui.chart(figures.group_heatmap(routing, gate, step, value=value), key=f"group_{value}")
if many:
    ui.chart(figures.specialisation_curves(spec, [gate]), key="group_spec_lines")

ui.panels("groups", ctx, run)
