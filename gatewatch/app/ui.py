"""Streamlit pieces shared by the pages: the sidebar and page context, run headers and banners, finding
cards, pickers, and the live-run refresh. Pages stay thin: they pick inputs here and draw figures from
:mod:`gatewatch.figures`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from ..findings import Finding, Thresholds, gate_unit
from ..run_reader import Run
from . import data, pages
from .state import (
    SEVERITY_COLOURS,
    STATUS_COLOURS,
    RunRef,
    cut_off_message,
    describe_units,
    discover,
    finding_link,
    keep_known,
    live_fingerprint,
    thresholds_from,
)

REFRESH_S = 3.0
CTX_KEY = "_gatewatch_context"


@dataclass
class Context:
    """What every page needs: the fixed root, the runs below it, the chosen run(s) and the thresholds."""

    root: Path
    refs: list[RunRef]
    current: RunRef | None
    selected: list[RunRef]
    thresholds: Thresholds
    auto_refresh: bool

    def by_id(self, ids: Sequence[str]) -> list[RunRef]:
        return pick(self.refs, ids)


def pick(refs: Sequence[RunRef], ids: Sequence[str]) -> list[RunRef]:
    """The runs with these ids, in the order asked (unknown ids are dropped)."""
    table = {r.id: r for r in refs}
    return [table[i] for i in keep_known(ids, list(table))]


def page_file(name: str) -> str:
    """A page's script path (absolute, so any entry script can route to it: main.py or app/dashboard.py)."""
    return pages.page_script(name)


def panels(page: str, ctx: Context, run: Run) -> None:
    """Draw what the registered quantities add to ``page`` (``ReadHalf.panels``), after the page's own charts."""
    for draw in pages.panels(page):
        draw(ctx, run)


def remember_selection() -> None:
    """Keep the Runs page's choice across pages, and show its first run if the current one left it."""
    chosen = list(st.session_state.get("selected_widget") or [])
    st.session_state["selected"] = chosen
    if chosen and st.session_state.get("run") not in chosen:
        st.session_state["run"] = chosen[0]


def _from_url(key: str, allowed: Sequence[str]) -> str | None:
    """The URL's value for ``key`` when it is one of ``allowed`` (anything else is ignored)."""
    value = st.query_params.get(key)
    return value if value in allowed else None


def sidebar(root: Path) -> Context:
    """Draw the sidebar (run, thresholds, live refresh) and store the page context for this script run."""
    refs = discover(root)
    ids = [r.id for r in refs]
    selected_ids = keep_known(st.session_state.get("selected") or ids[:1], ids)
    st.session_state["selected"] = selected_ids
    current = None
    with st.sidebar:
        st.caption(f"Runs folder: `{root}`")
        if ids:
            if st.session_state.get("run") not in ids:
                st.session_state["run"] = _from_url("run", ids) or (selected_ids or ids)[0]
            chosen = st.selectbox("Run", ids, key="run", bind="query-params",
                                  help="The run shown on Overview, Gates, Experts, Conflict and Ablations.")
            current = next(r for r in refs if r.id == chosen)
        with st.expander("Finding thresholds", expanded=False):
            values = {}
            for f in fields(Thresholds):
                values[f.name] = threshold_input(f.name, float(f.default))
        auto = st.toggle("Refresh live runs", value=True, key="auto_refresh",
                         help=f"Re-read live runs as soon as they write (checked every {REFRESH_S:g} s), on the Runs "
                              "page and on the pages of a live run.")
    ctx = Context(root=root, refs=refs, current=current, selected=pick(refs, selected_ids),
                  thresholds=thresholds_from(values), auto_refresh=auto)
    st.session_state[CTX_KEY] = ctx
    return ctx


def threshold_input(name: str, default: float) -> float:
    """A number input for one threshold: fractions in [0, 1], cosines (negative defaults) in [-1, 0],
    counts (defaults above 1) from 0 up."""
    fraction = default <= 1
    low, high = (-1.0, 0.0) if default < 0 else (0.0, 1.0 if fraction else None)
    return st.number_input(
        name.replace("_", " "), min_value=low, max_value=high, value=default,
        step=(0.01 if default >= 0.05 else 0.001) if fraction else 1.0, format="%.3f" if fraction else "%.0f",
        key=f"th_{name}", help=Thresholds.help(name),
    )


def context() -> Context:
    """The context the entry script stored for this run of the page."""
    ctx = st.session_state.get(CTX_KEY)
    if ctx is None:
        st.info("Open the dashboard through its entry page (gatewatch dashboard).")
        st.stop()
    return ctx


def no_runs(ctx: Context) -> None:
    """The message for a folder without runs (missing, empty, or holding something else)."""
    if not ctx.root.exists():
        st.warning(f"The runs folder `{ctx.root}` does not exist. Start the dashboard on a folder of runs: "
                   "`gatewatch dashboard RUNS_DIR`.")
    elif not ctx.root.is_dir():
        st.warning(f"`{ctx.root}` is a file, not a folder of runs. Start the dashboard on the folder that holds "
                   "your runs: `gatewatch dashboard RUNS_DIR`.")
    else:
        st.info(f"No gatewatch runs in `{ctx.root}`. A run is a folder with `run.json` and `tables/`, written by "
                "`gw.GateWatch(model, log_dir=...)`. Train with GateWatch, or start the dashboard on the folder "
                "that holds your runs.")


def current_run() -> tuple[Context, RunRef, Run, tuple]:
    """The chosen run, with its header and banners drawn; stops the page with a message if there is none."""
    ctx = context()
    if ctx.current is None:
        no_runs(ctx)
        st.stop()
    run, tok = load_or_stop(ctx, ctx.current)
    header(ctx, ctx.current, run, tok)
    return ctx, ctx.current, run, tok


def load_or_stop(ctx: Context, ref: RunRef) -> tuple[Run, tuple]:
    try:
        return data.load(ctx.root, ref)
    except data.RunUnavailable as err:
        st.warning(f"Run `{ref.id}` cannot be shown: {err}")
        st.stop()
        raise


def header(ctx: Context, ref: RunRef, run: Run, tok: tuple) -> None:
    """Run name, status, size, and the banners: cut off, live, read problems."""
    st.subheader(run.name)
    cols = st.columns([1, 1, 4], vertical_alignment="center")
    with cols[0]:
        st.badge(run.status, color=STATUS_COLOURS.get(run.status, "gray"))
    cols[1].caption(f"{run.steps:,} steps")
    cols[2].caption(f"{describe_units(run)} - {len(run.gate_names)} gate(s) - `{ref.id}`")
    if isinstance(note := run.meta.get("note"), str) and note:
        st.info(note, icon=":material/info:")
    if msg := cut_off_message(run):
        st.warning(msg, icon=":material/warning:")
    if run.status == "live":
        if ctx.auto_refresh:
            st.caption(f"Live run: the page refreshes when new windows are written (checked every {REFRESH_S:g} s).")
            _rerun_on_change(functools.partial(data.token, ctx.root, ref), tok)
        else:
            st.caption("Live run: switch on 'Refresh live runs' in the sidebar to follow it.")
    if run.problems:
        with st.expander(f"{len(run.problems)} file(s) could not be read and were skipped", icon=":material/warning:"):
            for p in run.problems:
                st.text(p)


def follow_live_runs(ctx: Context, live: Sequence[RunRef], stamps: Mapping[str, tuple]) -> None:
    """The Runs page's refresh: while ``live`` runs are listed, rerun the page when one of them writes or stops being
    live, or when the runs below the root change (checked every ``REFRESH_S``); nothing is scheduled when none is
    live. ``stamps``: each listed run's :func:`~gatewatch.app.state.write_stamp`, taken before its row was read."""
    if not live:
        return
    if not ctx.auto_refresh:
        st.caption(f"{len(live)} live run(s): switch on 'Refresh live runs' in the sidebar to follow them.")
        return
    st.caption(f"{len(live)} live run(s): the table refreshes as they write (checked every {REFRESH_S:g} s).")
    shown = tuple(r.id for r in ctx.refs), tuple((r.id, stamps[r.id], True) for r in live)
    _rerun_on_change(functools.partial(live_fingerprint, ctx.root, tuple(live)), shown)


@st.fragment(run_every=REFRESH_S)
def _rerun_on_change(check: Callable[[], tuple], shown: tuple) -> None:
    """Rerun the whole page when ``check()`` no longer returns what the page shows (``shown``)."""
    try:
        now = check()
    except data.RunUnavailable:
        return
    if now != shown:
        st.rerun()


SEVERITY_TITLES = {"error": "Error", "warning": "Warning", "info": "Note"}


def finding_card(finding: Finding, ref: RunRef, index: int) -> None:
    """One finding: severity, what was found since which step, what to try, and a link to its chart."""
    with st.container(border=True):
        cols = st.columns([6, 2], vertical_alignment="center")
        with cols[0]:
            st.badge(f"{SEVERITY_TITLES.get(finding.severity, finding.severity)}: {finding.code.replace('_', ' ')}",
                     color=SEVERITY_COLOURS.get(finding.severity, "gray"))
        cols[1].caption(f"since step {finding.step:,}")
        st.markdown(finding.message)
        st.markdown(f"**Try:** {finding.remedy}")
        page, params = finding_link(finding)
        st.page_link(page_file(page), label=f"Show on the {pages.titles()[page]} page", icon=":material/insights:",
                     query_params={**params, "run": ref.id})


def chart(fig: go.Figure, key: str) -> None:
    """Draw a figure from gatewatch.figures."""
    st.plotly_chart(fig, key=key, config={"displaylogo": False})


def kept_multiselect(label: str, options: Sequence[str], *, key: str, where: DeltaGenerator | None = None,
                     **kwargs: Any) -> list[str]:
    """A multiselect filter (drawn in ``where``, default the page) whose chosen values stay offered and chosen when
    no run has them any more, e.g. after a refresh of live runs, instead of being dropped from the filter."""
    chosen = st.session_state.get(key) or []
    return (where or st).multiselect(label, [*options, *(v for v in chosen if v not in options)], key=key, **kwargs)


def gate_picker(run: Run, *, label: str = "Gate") -> str:
    """Choose one gate of the run (also settable through the ``gate`` query parameter)."""
    gates = run.gate_names
    tasks = run.gates.drop_duplicates("gate").set_index("gate")["task"] if len(run.gates) else pd.Series(dtype=str)
    unit = gate_unit(run)

    def name(g: str) -> str:
        task = tasks.get(g)
        if task is None or pd.isna(task):
            return f"{g} ({unit})" if unit == "layer" else g
        return g if str(task) == g else f"{g} (task {task})"

    if st.session_state.get("gate") not in gates:
        st.session_state["gate"] = _from_url("gate", gates) or gates[0]
    return st.selectbox(label, gates, key="gate", format_func=name, bind="query-params")


def step_picker(steps: pd.Series, *, key: str, label: str = "Step") -> int | None:
    """A slider over the steps that have data (the last one by default); None when there are none."""
    values = sorted({int(s) for s in steps.dropna()})
    if not values:
        return None
    if len(values) == 1:
        st.caption(f"{label}: {values[0]:,} (the only window)")
        return values[0]
    gaps = pd.Series(values).diff().dropna()
    stride = int(gaps.min()) if len(gaps) else 1
    if st.session_state.get(key) is not None and not values[0] <= st.session_state[key] <= values[-1]:
        del st.session_state[key]
    return int(st.slider(label, min_value=values[0], max_value=values[-1], value=values[-1], step=max(stride, 1),
                         key=key, help="Charts below show the window ending at (or just before) this step."))


def per_expert_caption(run: Any, table: str) -> None:
    """Say, under a per-expert figure, when ``table`` keeps its rows in every K-th window only (run.json's
    ``per_expert_every``: a wide model's size bound); nothing when it keeps every window."""
    every = (run.meta.get("per_expert_every") or {}).get(table)
    if isinstance(every, int) and every > 1:
        st.caption(f"Per-expert values ({table}) are kept in the first window, every {every}th after it and the "
                   "run's last, so that a wide model's run stays small; the aggregate curves (entropy, MaxVio, "
                   "dead count ...) have every window.")


def empty(message: str) -> None:
    """Say why a section has nothing to show."""
    st.info(message, icon=":material/info:")
