"""The run directory: ``run.json`` plus one folder of Parquet files per table.

Layout::

    RUN/run.json                              metadata, rewritten (atomically) at every flush
    RUN/tables/<table>/part-000012.parquet    the rows of one flush
    RUN/tables/<table>/chunk-000001-000064.parquet   parts 1..64 merged (written, then parts removed)
    RUN/tensorboard/                          TensorBoard event files

Every file is written under a temporary name starting with ``.`` and renamed into place, so a file
is complete or absent; readers ignore dot-files. A part covered by a chunk is ignored by readers,
so a crash between writing a chunk and deleting its parts loses and duplicates nothing.

A failure to write (disk full, permission denied, folder removed) is reported once as a warning,
keeps the pending rows in memory and retries at the next flush; it never raises into training.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

PART = re.compile(r"^part-(\d{6,})\.parquet$")
CHUNK = re.compile(r"^chunk-(\d{6,})-(\d{6,})\.parquet$")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file is either complete or absent."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def atomic_write_parquet(path: Path, df: pd.DataFrame) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp, compression="zstd")
    os.replace(tmp, path)


def table_files(folder: Path) -> list[Path]:
    """The data files of one table folder in order, skipping parts already merged into a chunk."""
    if not folder.is_dir():
        return []
    chunks: list[tuple[int, int, Path]] = []
    parts: list[tuple[int, Path]] = []
    for f in folder.iterdir():
        if m := CHUNK.match(f.name):
            chunks.append((int(m[1]), int(m[2]), f))
        elif m := PART.match(f.name):
            parts.append((int(m[1]), f))
    covered = [(a, b) for a, b, _ in chunks]
    loose = [(i, f) for i, f in parts if not any(a <= i <= b for a, b in covered)]
    ordered = sorted([(a, f) for a, _, f in chunks] + loose, key=lambda t: t[0])
    return [f for _, f in ordered]


class RunDirWriter:
    """Writes tables and metadata into a run directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], *, compact_every: int = 64) -> None:
        self.path = Path(path)
        self.compact_every = compact_every
        self.seq = 0
        self.pending: list[tuple[int, dict[str, pd.DataFrame]]] = []
        self.failed = False
        self.failures = 0
        self.path.mkdir(parents=True, exist_ok=True)
        self.seq = self._last_seq()

    def _last_seq(self) -> int:
        """Continue numbering after the files already there (a resumed run)."""
        last = 0
        for folder in (self.path / "tables").glob("*"):
            for f in folder.glob("*.parquet"):
                if m := PART.match(f.name):
                    last = max(last, int(m[1]))
                elif m := CHUNK.match(f.name):
                    last = max(last, int(m[2]))
        return last

    def write_meta(self, meta: dict[str, Any]) -> bool:
        return self._guard(lambda: atomic_write_json(self.path / "run.json", meta), "run.json")

    def write(self, tables: dict[str, pd.DataFrame]) -> bool:
        """Queue one flush worth of rows and write everything queued. False if the write failed."""
        if any(len(df) for df in tables.values()):
            self.seq += 1
            self.pending.append((self.seq, tables))
        return self._guard(self._write_pending, "tables")

    def _write_pending(self) -> None:
        while self.pending:
            seq, tables = self.pending[0]
            for name, df in tables.items():  # a retry rewrites the same part names: nothing doubles
                if len(df):
                    folder = self.path / "tables" / name
                    folder.mkdir(parents=True, exist_ok=True)
                    atomic_write_parquet(folder / f"part-{seq:06d}.parquet", df)
            self.pending.pop(0)
            if seq % self.compact_every == 0:
                self.compact(loose_only=True)

    def compact(self, *, loose_only: bool = False) -> None:
        """Merge a table's files into one chunk (only the loose parts when ``loose_only``)."""
        for folder in sorted((self.path / "tables").glob("*")):
            files = table_files(folder)
            if loose_only:
                files = [f for f in files if PART.match(f.name)]
            if len(files) < 2:
                continue
            first, last = _span(files[0]), _span(files[-1])
            merged = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
            atomic_write_parquet(folder / f"chunk-{first[0]:06d}-{last[1]:06d}.parquet", merged)
            for f in files:
                f.unlink(missing_ok=True)

    def close(self, meta: dict[str, Any]) -> bool:
        ok = self._guard(self._write_pending, "tables")
        ok = self._guard(self.compact, "compaction") and ok
        return self.write_meta(meta) and ok

    def _guard(self, fn: Any, what: str) -> bool:
        try:
            fn()
        except Exception as err:  # logging must never break training
            self.failures += 1
            if not self.failed:
                warnings.warn(
                    f"gatewatch could not write {what} in {self.path}: {err}. Training goes on; the rows are "
                    "kept in memory and written at the next flush.",
                    RuntimeWarning, stacklevel=3,
                )
            self.failed = True
            return False
        if self.failed:
            warnings.warn(f"gatewatch writes to {self.path} work again.", RuntimeWarning, stacklevel=3)
        self.failed = False
        return True


def _span(f: Path) -> tuple[int, int]:
    if m := CHUNK.match(f.name):
        return int(m[1]), int(m[2])
    m = PART.match(f.name)
    assert m is not None
    return int(m[1]), int(m[1])
