"""The run-directory sink: writes each flush's tables and ``run.json`` (format: :mod:`gatewatch.run_format`).

Merges are levelled, so the number of files stays logarithmic in the number of flushes and every
row is rewritten only a few times: after flush ``k * C`` (``C = compact_every``) the loose parts
become one chunk; after flush ``k * C**2`` the files of the last ``C**2`` flushes become one chunk,
and so on. Merges stream one row group at a time, so their memory does not grow with the run.
``close()`` merges each table into one file.

A failure to write (disk full, permission denied, folder removed) is reported once as a warning,
keeps the pending rows in memory (at most ``max_pending_rows``; the oldest flushes are dropped
beyond that, and the drop is recorded in the ``events`` table) and retries at the next flush; it
never raises into training. A run directory removed while the run goes on is created again at the
next flush (with an event saying so); the rows that were in it are gone.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from ..run_format import (
    FLUSHES,
    PART,
    atomic_write_json,
    atomic_write_parquet,
    committed,
    merge_parquet,
    span,
    table_files,
)
from ..schema import frame
from ..summary import SUMMARY_FILE, build_summary, digest, headline
from . import Sink


class RunDirWriter(Sink):
    """Writes tables, metadata and the run summary (:mod:`gatewatch.summary`) into a run directory (see the
    module docstring). The summary is rewritten with run.json at each flush and at close; its findings are
    those of the recent windows, evaluated by the watch (``wants_findings``) and at close."""

    wants_findings = True

    def __init__(
        self, path: str | os.PathLike[str], *, compact_every: int = 64, max_pending_rows: int = 200_000,
        durable: bool = False,
    ) -> None:
        if compact_every < 2:
            raise ValueError(f"compact_every must be at least 2 (flushes per merge), got {compact_every}.")
        self.path = Path(path)
        self.compact_every = compact_every
        self.max_pending_rows = max_pending_rows
        self.durable = durable
        self.pending: list[tuple[int, dict[str, pd.DataFrame]]] = []
        self.failing: dict[str, int | None] = {}  # what cannot be written now -> first step not written
        self.failures = 0
        self.notes: list[dict[str, Any]] = []  # events rows, written once writing works
        self.dropped: list[int] | None = None  # [first step, last step, flushes] dropped in this outage
        self.head: dict[str, Any] = headline(pd.DataFrame(), pd.DataFrame())  # the last window's numbers
        self.found: dict[str, Any] | None = None  # findings digest (None: not evaluated yet)
        self.meta: dict[str, Any] = {}
        self.path.mkdir(parents=True, exist_ok=True)
        self.seq = self._last_seq()

    @property
    def failed(self) -> bool:
        """True while some write keeps failing."""
        return bool(self.failing)

    def _last_seq(self) -> int:
        """Continue numbering after the files already there (a resumed run)."""
        spans = [span(f.name) for folder in (self.path / "tables").glob("*") for f in folder.glob("*.parquet")]
        return max([s[1] for s in spans if s], default=0)

    def write_meta(self, meta: dict[str, Any]) -> bool:
        def write() -> None:
            self._ensure_dir(meta.get("steps"))
            atomic_write_json(self.path / "run.json", meta, self.durable)

        self.meta = meta
        return self._guard(write, "run.json", meta.get("steps")) and self._write_summary()

    def _write_summary(self) -> bool:
        summary = build_summary(self.meta, self.head, self.found)
        return self._guard(lambda: atomic_write_json(self.path / SUMMARY_FILE, summary, self.durable), SUMMARY_FILE)

    def log_findings(self, step: int, findings: list[dict[str, Any]]) -> None:
        """Rewrite the summary with the findings of the recent windows at ``step``."""
        self.found = digest(findings, step)
        self._write_summary()

    def write(self, tables: dict[str, pd.DataFrame]) -> bool:
        """Queue one flush worth of rows and write everything queued. False if the write failed."""
        self._update_head(tables)
        if any(len(df) for df in tables.values()):
            self.seq += 1
            self.pending.append((self.seq, tables))
            self._bound_pending()
        first = _first_step(self.pending[0][1]) if self.pending else None
        return self._guard(self._write_pending, "tables", first)

    def _update_head(self, tables: dict[str, pd.DataFrame]) -> None:
        fresh = headline(tables.get("gates", pd.DataFrame()), tables.get("losses", pd.DataFrame()))
        if fresh["step"] is not None:
            self.head.update(step=fresh["step"], gates=fresh["gates"])
        if fresh["losses"]:
            self.head["losses"] = fresh["losses"]

    def _bound_pending(self) -> None:
        """Drop the oldest queued flushes beyond ``max_pending_rows`` rows, and record the loss."""
        sizes = [sum(len(df) for df in tables.values()) for _, tables in self.pending]
        while len(self.pending) > 1 and sum(sizes) > self.max_pending_rows:
            tables = self.pending.pop(0)[1]
            sizes.pop(0)
            first, last = _first_step(tables) or 0, _last_step(tables) or 0
            if self.dropped is None:
                self.dropped = [first, last, 0]
                warnings.warn(f"gatewatch cannot write {self.path} and holds {self.max_pending_rows} rows in memory; "
                              "older rows are dropped until writing works again.", RuntimeWarning, stacklevel=3)
            self.dropped[1:] = [last, self.dropped[2] + 1]

    def _note(self, step: int | None, kind: str, message: str) -> None:
        warnings.warn(f"gatewatch: {message} ({self.path}).", RuntimeWarning, stacklevel=4)
        self.notes.append({"step": step if step is not None else 0, "kind": kind, "source": "run_dir",
                           "message": message})

    def _ensure_dir(self, step: int | None) -> None:
        """Create the run directory again if it was removed while the run goes on."""
        if not self.path.is_dir():
            self.path.mkdir(parents=True, exist_ok=True)
            self._note(step, "run_dir_recreated", "the run directory was removed while the run went on and was "
                       "created again; the rows written before are lost")

    def _write_pending(self) -> None:
        while self.pending:
            seq, tables = self.pending[0]
            self._ensure_dir(_first_step(tables))
            self._write_part(seq, tables)
            self.pending.pop(0)
        if self.dropped is not None:
            first, last, flushes = self.dropped
            self.notes.append({"step": first, "kind": "rows_dropped", "source": "run_dir", "message": (
                f"the run directory could not be written for a long time: the rows of steps {first}..{last} "
                f"({flushes} flushes) were dropped to keep memory bounded")})
            self.dropped = None
        if self.notes:
            self._write_part(self.seq + 1, {"events": frame("events", self.notes)})
            self.seq += 1
            self.notes = []

    def _write_part(self, seq: int, tables: dict[str, pd.DataFrame]) -> None:
        for name, df in tables.items():  # a retry rewrites the same part names: nothing doubles
            if len(df):
                folder = self.path / "tables" / name
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write_parquet(folder / f"part-{seq:06d}.parquet", df, self.durable)
        record = pd.DataFrame({"seq": [seq], "step": [_last_step(tables) or 0], "time": [time.time()]})
        (self.path / "tables" / FLUSHES).mkdir(parents=True, exist_ok=True)
        atomic_write_parquet(self.path / "tables" / FLUSHES / f"part-{seq:06d}.parquet", record, self.durable)
        if seq % self.compact_every == 0:
            self._guard(lambda: self._compact_after(seq), "compaction")

    def _compact_after(self, seq: int) -> None:
        """The levelled merge due after flush ``seq`` (a multiple of ``compact_every``)."""
        width = self.compact_every
        while seq % (width * self.compact_every) == 0:
            width *= self.compact_every
        done = committed(self.path / "tables")
        for folder in self._folders():
            files = table_files(folder, done)
            loose = [span(f.name)[0] for f in files if PART.match(f.name)]  # type: ignore[index]
            start = min([seq - width + 1, *loose])  # parts a failed merge left behind come along
            self._merge(folder, [f for f in files if span(f.name)[0] >= start])  # type: ignore[index]

    def compact(self, *, loose_only: bool = False) -> None:
        """Merge each table's files into one file (only its loose parts when ``loose_only``)."""
        done = committed(self.path / "tables")
        for folder in self._folders():
            files = table_files(folder, done)
            self._merge(folder, [f for f in files if PART.match(f.name)] if loose_only else files)

    def _folders(self) -> list[Path]:
        return sorted(f for f in (self.path / "tables").glob("*") if f.is_dir())

    def _merge(self, folder: Path, files: list[Path]) -> None:
        if len(files) < 2:
            return
        first, last = span(files[0].name), span(files[-1].name)
        assert first is not None and last is not None
        merge_parquet(files, folder / f"chunk-{first[0]:06d}-{last[1]:06d}.parquet", self.durable)
        for f in files:
            f.unlink(missing_ok=True)
        pa.default_memory_pool().release_unused()  # hand the merge's buffers back to the system

    def close(self, report: dict[str, Any] | None = None) -> bool:
        """Write what is queued and merge each table into one file; the watch writes the final run.json (and with
        it the summary, whose findings are the report's) after."""
        if report is not None and isinstance(report.get("findings"), list):
            self.found = digest(report["findings"], self.meta.get("steps"))
        ok = self._guard(self._write_pending, "tables")
        return self._guard(self.compact, "compaction") and ok

    def _guard(self, fn: Callable[[], None], what: str, step: int | None = None) -> bool:
        """Run ``fn``; on failure warn once per failing ``what`` and return False (never raise)."""
        try:
            fn()
        except Exception as err:  # logging must never break training
            self.failures += 1
            if what not in self.failing:
                self.failing[what] = step
                warnings.warn(
                    f"gatewatch could not write {what} in {self.path}: {type(err).__name__}: {err}. Training goes "
                    "on; the rows are kept in memory and written at a later flush.", RuntimeWarning, stacklevel=3,
                )
            return False
        if what in self.failing:
            since = self.failing.pop(what)
            message = f"writing {what} failed from step {since} on and works again; the rows kept were written late"
            warnings.warn(f"gatewatch: {message} ({self.path}).", RuntimeWarning, stacklevel=3)
            if what == "tables":
                self.notes.append({"step": since or 0, "kind": "write_failure", "source": "run_dir",
                                   "message": message})
        return True


def _first_step(tables: dict[str, pd.DataFrame]) -> int | None:
    steps = [int(df["step"].min()) for df in tables.values() if len(df) and "step" in df]
    return min(steps) if steps else None


def _last_step(tables: dict[str, pd.DataFrame]) -> int | None:
    steps = [int(df["step"].max()) for df in tables.values() if len(df) and "step" in df]
    return max(steps) if steps else None
