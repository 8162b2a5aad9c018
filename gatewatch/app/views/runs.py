"""Runs: every run below the folder, with its tasks, gates, steps, status and findings; choose the runs to look at."""

import pandas as pd
import streamlit as st

from gatewatch.app import data, ui

ctx = ui.context()
st.title("Runs")
if not ctx.refs:
    ui.no_runs(ctx)
    st.stop()

rows, unreadable = [], []
for ref in ctx.refs:
    try:
        rows.append(data.summary(ctx.root, ref, ctx.thresholds))
    except data.RunUnavailable as err:
        unreadable.append(f"`{ref.id}`: {err}")

st.caption(f"{len(ctx.refs)} run(s) in `{ctx.root}`. Findings use the thresholds in the sidebar.")
st.dataframe(
    pd.DataFrame(rows), hide_index=True,
    column_config={
        "run": st.column_config.TextColumn("run", help="folder below the runs folder"),
        "steps": st.column_config.NumberColumn("steps", format="%d"),
        "findings": st.column_config.ListColumn("findings", help="what the rules found (severity in brackets)"),
        "problems": st.column_config.NumberColumn("unreadable files", format="%d"),
    },
)
for msg in unreadable:
    st.warning(msg)

ids = [r.id for r in ctx.refs]
if "selected_widget" not in st.session_state:
    st.session_state["selected_widget"] = [r.id for r in ctx.selected]
st.multiselect("Runs to look at", ids, key="selected_widget", on_change=ui.remember_selection,
               help="The first is shown on Overview, Gates, Experts and Conflict; all of them on Compare.")
if ctx.current is not None:
    st.page_link(ui.page_file("overview"), label=f"Open the overview of {ctx.current.id}",
                 icon=":material/summarize:", query_params={"run": ctx.current.id})
