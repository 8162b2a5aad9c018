"""Overview of a run: the findings first (what, since when, what to try, where to look), then the last window."""

import pandas as pd
import streamlit as st

from gatewatch import figures
from gatewatch.app import data, ui

ctx, ref, run, tok = ui.current_run()
found = data.findings(ref, tok, ctx.thresholds)
st.markdown("#### Findings")
if not found:
    st.success("No findings: the gates look healthy under the current thresholds.", icon=":material/check_circle:")
for i, finding in enumerate(found):
    ui.finding_card(finding, ref, i)
if found:
    from gatewatch.app.ablations import remedy_button

    remedy_button(ref.path, ref.id, run.status, [f.code for f in found])

report = data.report(ref, tok, ctx.thresholds)
st.markdown("#### Gates in the last window")
if report["gates"]:
    gates = pd.DataFrame(report["gates"]).drop(columns=["expert_names", "expert_share"])
    st.dataframe(gates, hide_index=True)
else:
    ui.empty("No gate window with samples yet.")
experts = report["experts"]
if experts["names"]:
    dead = [experts["names"][i] for i in experts["dead"]]
    load_cv = f"{experts['load_cv']:.2f}" if experts["load_cv"] is not None else "-"
    st.caption(f"Load CV {load_cv}; dead experts: {', '.join(dead) or 'none'}.")
ui.chart(figures.loss_curves({run.name: run.losses}), key="losses")
