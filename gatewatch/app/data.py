"""Cached reading of runs for the dashboard.

A run is read once per change token (:func:`gatewatch.app.state.change_token`: run.json's and the table
files' names, sizes and mtimes), so a live run is read again as soon as it writes, and an unchanged one is
never re-read. Findings and reports are cached per run, token and thresholds. The Runs page's rows come from the
runs' kept summaries; a run without one is read in full once and its summary kept (:mod:`gatewatch.summary_cache`).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path

import streamlit as st

from ..findings import Finding, Thresholds, find
from ..liveness import run_status
from ..report import build_report
from ..run_reader import Run, RunReadError, load_run
from ..summary import SUMMARY_FILE
from ..summary_cache import kept_summary, summarize
from .state import OutsideRoot, RunRef, change_token, check_inside, outside_file, summary_row, write_stamp


class RunUnavailable(Exception):
    """A run could not be shown; the message says why (and is shown instead of a traceback)."""


@st.cache_data(max_entries=64, max_size="1GiB", show_spinner="Reading the run ...")
def _read(path: str, token: tuple) -> Run:
    return load_run(path)


@st.cache_data(max_entries=64, show_spinner=False)
def _findings(path: str, token: tuple, thresholds: tuple[tuple[str, float], ...]) -> list[Finding]:
    return find(_read(path, token), Thresholds.from_dict(dict(thresholds)))


@st.cache_data(max_entries=64, show_spinner=False)
def _report(path: str, token: tuple, thresholds: tuple[tuple[str, float], ...]) -> dict:
    run = _read(path, token)
    th = Thresholds.from_dict(dict(thresholds))
    return build_report(run, th, _findings(path, token, thresholds))


def token(root: Path, ref: RunRef) -> tuple:
    """The run's change token, after checking it lies inside ``root``."""
    try:
        check_inside(root, ref.path)
        return change_token(ref.path)
    except OutsideRoot as err:
        raise RunUnavailable(str(err)) from err
    except OSError as err:
        raise RunUnavailable(f"{ref.id}: cannot be read ({err}).") from err


@contextmanager
def _readable(ref: RunRef) -> Iterator[None]:
    """Turn any failure to read a run into :class:`RunUnavailable` with a plain message."""
    try:
        yield
    except RunReadError as err:
        raise RunUnavailable(str(err)) from err
    except Exception as err:  # unreadable folder, permissions, a file vanishing mid-read
        raise RunUnavailable(f"{ref.id}: could not be read ({type(err).__name__}: {err}).") from err


def load(root: Path, ref: RunRef) -> tuple[Run, tuple]:
    """The run and its change token; :class:`RunUnavailable` with a plain message when it cannot be read."""
    tok = token(root, ref)
    with _readable(ref):
        return _read(str(ref.path), tok), tok


def _key(thresholds: Thresholds) -> tuple[tuple[str, float], ...]:
    return tuple(sorted(thresholds.to_dict().items()))


def findings(ref: RunRef, tok: tuple, thresholds: Thresholds) -> list[Finding]:
    """The run's findings under ``thresholds`` (cached)."""
    return _findings(str(ref.path), tok, _key(thresholds))


# what the Runs page read in full this session: run id -> (the run's write stamp after the read, its row or why the
# run cannot be shown); the stamp (run.json's and summary.json's size and mtime) changes when the run writes
Reads = MutableMapping[str, tuple[tuple, "dict[str, object] | str"]]


def kept_row(root: Path, ref: RunRef, reads: Reads) -> dict[str, object] | str | None:
    """The Runs page's row of a run: the one read in full this session while the run is unchanged (it counts the
    unreadable files), else from its kept summary (``summary.json`` or the summary cache; findings at the default
    thresholds, as the run recorded them); a message when the run cannot be shown; None when it waits to be read."""
    if (p := outside_file(root, ref.path, (SUMMARY_FILE, "run.json"))) is not None:
        return f"{p} points outside the dashboard's folder {root}; it is not shown."
    if ref.id in reads and reads[ref.id][0] == write_stamp(ref.path):
        return reads[ref.id][1]
    kept = kept_summary(ref.path)
    return None if kept is None else summary_row(ref.id, kept, run_status(kept, ref.path))


def read_in_full(root: Path, ref: RunRef, reads: Reads) -> None:
    """Read a run without a kept summary in full, keep its summary (:func:`gatewatch.summary_cache.summarize`) and
    record its row, or why it cannot be shown, in ``reads``."""
    try:
        token(root, ref)  # raises when a file of the run lies outside the root
        with _readable(ref):
            done = summarize(ref.path)
        row: dict[str, object] | str = summary_row(ref.id, done.summary, run_status(done.summary, ref.path),
                                                   done.problems)
    except RunUnavailable as err:
        row = str(err)
    reads[ref.id] = (write_stamp(ref.path), row)


def report(ref: RunRef, tok: tuple, thresholds: Thresholds) -> dict:
    """The run's report dict (see :mod:`gatewatch.report`), cached."""
    return _report(str(ref.path), tok, _key(thresholds))
