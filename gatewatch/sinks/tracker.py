"""What the experiment-tracker sinks (MLflow, W&B) share: the scalars they chart, the findings they summarise,
and the failure handling that keeps a tracker from ever stopping training.

A tracker sink starts (or joins) its run lazily, at the first ``write_meta`` (when the watch starts, on rank 0
only), so a sink built on every rank of a DDP job opens one run. The scalars of each flush
(:func:`~gatewatch.sinks.scalars.scalars`, every window, not thinned as TensorBoard's are) wait in ``pending``
until the tracker took them; a failure (tracker down, disk full, a bad key) is reported once as a warning,
counted in ``failures``, and the scalars are sent again at the next flush (at most ``max_pending`` of them are
kept; the oldest are dropped beyond that and counted in ``dropped``). A warning says when the tracker works
again.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from typing import Any

import pandas as pd

from ..rules import SEVERITY_ORDER
from . import Sink
from .scalars import Scalar, scalars

TAG_VALUE_CHARS = 250  # finding summaries stay short: the trackers show them in run tables


class TrackerSink(Sink):
    """Base of the tracker sinks. Subclasses implement ``_start``, ``_send`` (consume ``pending``),
    ``_log_findings``, ``_report`` and ``_end``; this class calls them so that nothing raises into training.
    The calls run in the training process, at flush time: a tracker that hangs (a server that does not answer)
    delays training by its own timeouts and retries."""

    wants_findings = True
    tracker = "the tracker"

    def __init__(self, prefix: str, max_pending: int) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string such as 'gatewatch/', got {type(prefix).__name__}.")
        self.prefix = prefix
        self.max_pending = max_pending
        self.pending: list[Scalar] = []
        self.started = False
        self.closed = False
        self.failing = False
        self.failures = 0  # calls that failed
        self.dropped = 0  # scalars dropped because the tracker failed for too long
        self.name: str | None = None  # the run directory's name (run.json), used to name a run this sink starts
        self._findings_logged: str | None = None  # JSON of the findings last logged (logged again only on change)

    # ------------------------------------------------------------------ the Sink protocol
    def write(self, tables: dict[str, pd.DataFrame]) -> bool:
        """Send this flush's scalars (and those kept from failed flushes); False if the tracker failed."""
        if self.closed:
            return True
        self.pending.extend(scalars(tables))
        if len(self.pending) > self.max_pending:
            self.dropped += len(self.pending) - self.max_pending
            self.pending = self.pending[-self.max_pending :]
        return self._attempt("log scalars", self._send_pending, recovered=True)

    def write_meta(self, meta: dict[str, Any]) -> bool:
        """Start or join the run at the first call (rank 0 only ever calls it)."""
        if self.closed:
            return True
        self.name = self.name or meta.get("name")
        return self.started or self._attempt("start a run", lambda: None)

    def log_findings(self, step: int, findings: list[dict[str, Any]]) -> None:
        """Log the findings of the recent windows (the full list only when it differs from the one logged last)."""
        if self.closed:
            return
        text = json.dumps(findings, sort_keys=True, default=str)
        changed = text != self._findings_logged
        if self._attempt("log findings", lambda: self._log_findings(step, findings, changed)):
            self._findings_logged = text

    def close(self, report: dict[str, Any] | None = None) -> None:
        """Send what is left and the report, and end the run if this sink started it (never raises)."""
        if self.closed:
            return
        try:
            if self.pending:
                self._attempt("log scalars", self._send_pending, recovered=True)
            if report is not None:
                self._attempt("log the report", lambda: self._report(report))
        finally:
            self.closed = True
            if self.started:
                self._attempt("end its run", lambda: self._end(report))
            if self.pending or self.dropped:
                warnings.warn(f"gatewatch could not send {len(self.pending) + self.dropped} scalars to {self.tracker}; "
                              "the run directory has them all.", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ failure handling
    def _attempt(self, what: str, action: Callable[[], Any], *, recovered: bool = False) -> bool:
        try:
            self._ensure_started()
            action()
        except Exception as err:  # a tracker must never break training
            self.failures += 1
            if not self.failing:
                warnings.warn(f"gatewatch could not {what} in {self.tracker}: {type(err).__name__}: {err}. Training "
                              "goes on; it tries again at the next flush.", RuntimeWarning, stacklevel=3)
            self.failing = True
            return False
        if self.failing and recovered:
            warnings.warn(f"gatewatch logs to {self.tracker} again"
                          + (f" ({self.dropped} scalars were dropped meanwhile)." if self.dropped else "."),
                          RuntimeWarning, stacklevel=3)
            self.failing = False
        return True

    def _ensure_started(self) -> None:
        if not self.started:
            self._start()
            self.started = True

    def _send_pending(self) -> None:
        if self.pending:
            self._send()

    # ------------------------------------------------------------------ what a tracker implements
    def _start(self) -> None:
        raise NotImplementedError

    def _send(self) -> None:
        """Log ``self.pending``, removing what was logged as it goes (a failure midway keeps the rest)."""
        raise NotImplementedError

    def _log_findings(self, step: int, findings: list[dict[str, Any]], changed: bool) -> None:
        """Log the summary of ``findings`` at ``step``; the full list (an artifact, a table) when ``changed``."""
        raise NotImplementedError

    def _report(self, report: dict[str, Any]) -> None:
        raise NotImplementedError

    def _end(self, report: dict[str, Any] | None) -> None:
        raise NotImplementedError


def finding_summaries(findings: list[dict[str, Any]]) -> dict[str, str]:
    """One short line per finding code: the worst severity, the first step, and what it concerns, e.g.
    ``"warning @ step 120: ctr, cvr"``."""
    by_code: dict[str, list[dict[str, Any]]] = {}
    for f in findings:
        by_code.setdefault(str(f.get("code")), []).append(f)
    out = {}
    for code, group in by_code.items():
        severity = min((str(f.get("severity")) for f in group),
                       key=lambda s: SEVERITY_ORDER.get(s, len(SEVERITY_ORDER)))
        steps = [int(f["step"]) for f in group if f.get("step") is not None]
        who = sorted({str(w) for f in group if (w := f.get("gate") or f.get("task") or f.get("expert"))})
        text = severity + (f" @ step {min(steps)}" if steps else "") + (f": {', '.join(who)}" if who else "")
        out[code] = text if len(text) <= TAG_VALUE_CHARS else text[: TAG_VALUE_CHARS - 1] + "…"
    return out


def findings_count(findings: list[dict[str, Any]]) -> str:
    """``"2 errors, 1 warning"`` (``"none"`` when there is none)."""
    counts = {s: sum(f.get("severity") == s for f in findings) for s in SEVERITY_ORDER}
    return ", ".join(f"{n} {s}{'s' if n > 1 and s != 'info' else ''}" for s, n in counts.items() if n) or "none"


def by_step(pending: list[Scalar]) -> list[tuple[int, dict[str, float]]]:
    """The scalars grouped by step, in the order the steps first appear (for trackers that log a row per step)."""
    rows: dict[int, dict[str, float]] = {}
    for tag, value, step in pending:
        rows.setdefault(step, {})[tag] = value
    return list(rows.items())


__all__ = ["TrackerSink", "by_step", "finding_summaries", "findings_count"]
