"""Compare: two or more runs on the same charts (e.g. with and without gate dropout)."""

import streamlit as st

from gatewatch import figures
from gatewatch.app import data, ui
from gatewatch.app.state import finding_badges

ctx = ui.context()
st.title("Compare runs")
if len(ctx.refs) < 2:
    if not ctx.refs:
        ui.no_runs(ctx)
    else:
        ui.empty("Comparing needs at least two runs in the folder; there is one.")
    st.stop()

ids = [r.id for r in ctx.refs]
if "compare_runs" not in st.session_state:
    chosen = [r.id for r in ctx.selected]
    st.session_state["compare_runs"] = chosen if len(chosen) >= 2 else ids[:2]
chosen = st.multiselect("Runs", ids, key="compare_runs", bind="query-params",
                        help="Pick two or more runs to draw on the same axes.")
if len(chosen) < 2:
    ui.empty("Pick at least two runs.")
    st.stop()

runs, rows = {}, []
for ref in ctx.by_id(chosen):
    try:
        run, tok = data.load(ctx.root, ref)
    except data.RunUnavailable as err:
        st.warning(f"`{ref.id}` is left out: {err}")
        continue
    runs[ref.id] = run
    rows.append({"run": ref.id, "status": run.status, "steps": run.steps,
                 "findings": finding_badges(data.findings(ref, tok, ctx.thresholds)) or ["healthy"]})
st.dataframe(rows, hide_index=True, column_config={"findings": st.column_config.ListColumn("findings")})

metric = st.selectbox("Gate metric", list(figures.GATE_METRICS), key="compare_metric",
                      format_func=lambda m: figures.GATE_METRICS[m][0])
ui.chart(figures.compare_gate_metric({k: r.gates for k, r in runs.items()}, metric), key="metric")
ui.chart(figures.compare_load_balance({k: r.experts for k, r in runs.items()}), key="balance")
ui.chart(figures.loss_curves({k: r.losses for k, r in runs.items()}), key="losses")
evals = {k: r.tables["eval"] for k, r in runs.items() if len(r.tables.get("eval", ()))}
if evals:
    ui.chart(figures.compare_eval(evals), key="eval")
conflicts = {k: r.tables["conflict"] for k, r in runs.items() if len(r.tables.get("conflict", ()))}
if conflicts:
    ui.chart(figures.compare_conflict(conflicts), key="conflict")
