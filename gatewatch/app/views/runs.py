"""Runs: every run below the folder, read from the runs' summaries, as an explorer: search names, filter by status,
severity, finding and config values, sort by any column, and pick the runs to look at from the filtered list. While
runs are live the page re-reads them as they write (filters and choice kept).

The runs with a kept summary (summary.json or the summary cache) show at once. The others are read in full after
the page is drawn, for :data:`~gatewatch.app.state.READ_BUDGET_S` at a time (a shorter first read while no row is
shown: :func:`~gatewatch.app.state.read_budget`), each keeping its summary; then the page reruns with them in the
table, under a progress bar, until every run is in."""

import pandas as pd
import streamlit as st

from gatewatch.app import data, explorer, state, ui

ctx = ui.context()
st.title("Runs")
if not ctx.refs:
    ui.no_runs(ctx)
    st.stop()

stamps = {ref.id: state.write_stamp(ref.path) for ref in ctx.refs}  # before the reads: a later write shows as new
reads: data.Reads = st.session_state.setdefault("runs_read_in_full", {})
found = state.runs_table(ctx.refs, lambda ref: data.kept_row(ctx.root, ref, reads))


def read_more() -> None:
    """Read runs without a summary for the time budget, then rerun the page to show them."""
    state.read_within(found.pending, lambda ref: data.read_in_full(ctx.root, ref, reads),
                      state.read_budget(len(found.rows)))
    st.rerun()


if found.pending:
    total = len(found.pending) + sum(ref.id in reads for ref in ctx.refs)
    st.progress((total - len(found.pending)) / total,
                text=f"Reading {len(found.pending)} run(s) without a summary in full (each once: its summary is "
                     f"kept); {total - len(found.pending)} of {total} read.")
table = pd.DataFrame(found.rows)
if table.empty:
    for msg in found.unreadable:
        st.warning(msg)
    if found.pending:
        read_more()
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
           "summary at the default thresholds (a run without one is read in full once, and its summary kept)"
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
                                                  help="counted when this session read the run in full"),
    },
)
for msg in found.unreadable:
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
if found.pending:  # the page is drawn: read more of the runs without a summary, then show them
    read_more()
