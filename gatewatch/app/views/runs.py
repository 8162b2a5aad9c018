"""Runs: every run below the folder, read from the runs' summaries, as an explorer: search names, filter by status,
severity, finding and config values, sort by any column, and pick the runs to look at from the filtered list. While
runs are live the page re-reads them as they write (filters and choice kept)."""

import pandas as pd
import streamlit as st

from gatewatch.app import data, explorer, state, ui

ctx = ui.context()
st.title("Runs")
if not ctx.refs:
    ui.no_runs(ctx)
    st.stop()

stamps = {ref.id: state.write_stamp(ref.path) for ref in ctx.refs}  # before the reads: a later write shows as new
rows, unreadable = [], []
for ref in ctx.refs:
    try:
        rows.append(data.summary(ctx.root, ref, ctx.thresholds))
    except data.RunUnavailable as err:
        unreadable.append(f"`{ref.id}`: {err}")
table = pd.DataFrame(rows)
if table.empty:
    for msg in unreadable:
        st.warning(msg)
    st.stop()

search_col, status_col, severity_col, code_col = st.columns([2, 1, 1, 2])
search = search_col.text_input("Search run names", key="runs_search", placeholder="e.g. census polarized")
statuses = ui.kept_multiselect("Status", sorted(table["status"].unique()), key="runs_status", where=status_col)
severities = ui.kept_multiselect("Worst severity", [s for s in explorer.SEVERITIES if s in set(table["severity"])],
                                 key="runs_severity", where=severity_col)
codes = ui.kept_multiselect("Finding", sorted({c for have in table["codes"] for c in have}), key="runs_codes",
                            where=code_col, help="runs with any of these findings")
config_filter = {}
options = explorer.config_columns(table)
with st.expander("Filter by config values" + (f" ({len(options)} keys)" if options else " (no config recorded)")):
    keys = ui.kept_multiselect("Config keys", options, format_func=lambda c: c.removeprefix("config: "),
                               key="runs_config_keys")
    for column in keys:
        config_filter[column] = ui.kept_multiselect(column.removeprefix("config: "),
                                                    explorer.config_values(table, column), key=f"runs_config_{column}")
sort_col, order_col = st.columns([3, 1])
shown_columns = [c for c in table.columns if c != "codes"]
sort_by = sort_col.selectbox("Sort by", shown_columns, index=shown_columns.index("severity"), key="runs_sort")
descending = order_col.toggle("Descending", key="runs_descending")

filtered = explorer.sort_runs(
    explorer.filter_runs(table, search=search, statuses=statuses, severities=severities, codes=codes,
                         config=config_filter),
    sort_by, descending=descending)
changed = ctx.thresholds.to_dict() != type(ctx.thresholds)().to_dict()
st.caption(f"{len(filtered)} of {len(table)} run(s) in `{ctx.root}`. Findings are those each run recorded in its "
           "summary at the default thresholds (runs without one are read in full, once)"
           + ("; the Overview applies the sidebar's changed thresholds." if changed else "."))
st.dataframe(
    filtered[shown_columns], hide_index=True,
    column_config={
        "run": st.column_config.TextColumn("run", help="folder below the runs folder"),
        "steps": st.column_config.NumberColumn("steps", format="%d"),
        "findings": st.column_config.ListColumn("findings", help="what the rules found (severity in brackets)"),
        "max polarization": st.column_config.NumberColumn("max polarization", format="%.2f",
                                                          help="the largest polarization of a gate, last window"),
        "problems": st.column_config.NumberColumn("unreadable files", format="%d",
                                                  help="counted for runs read in full"),
    },
)
for msg in unreadable:
    st.warning(msg)
ui.follow_live_runs(ctx, ctx.by_id(table.loc[table["status"] == "live", "run"].tolist()), stamps)

ids = filtered["run"].tolist()
if "selected_widget" not in st.session_state:
    st.session_state["selected_widget"] = [r.id for r in ctx.selected]
chosen = st.session_state["selected_widget"] = [i for i in st.session_state["selected_widget"]
                                                 if i in set(table["run"])]
st.multiselect("Runs to look at", list(dict.fromkeys([*chosen, *ids])), key="selected_widget",
               on_change=ui.remember_selection,
               help="Offered: the filtered runs. The first is shown on Overview, Gates, Experts and Conflict; all of "
                    "them on Compare.")
if ctx.current is not None:
    st.page_link(ui.page_file("overview"), label=f"Open the overview of {ctx.current.id}",
                 icon=":material/summarize:", query_params={"run": ctx.current.id})
if len(ctx.selected) > 1:
    st.page_link(ui.page_file("compare"), label=f"Compare the {len(ctx.selected)} chosen runs",
                 icon=":material/stacked_line_chart:")
