"""The run-directory format, shared by the writer (``sinks.run_dir``) and the reader (``runs``).

Layout::

    RUN/run.json                              metadata, rewritten (atomically) at every flush
    RUN/tables/<table>/part-000012.parquet    the rows of one flush
    RUN/tables/<table>/chunk-000001-000064.parquet   parts 1..64 merged (written, then parts removed)
    RUN/tables/_flushes/part-000012.parquet   the commit record of flush 12, written after its parts
    RUN/tensorboard/                          TensorBoard event files

Every file is written under a temporary name starting with ``.`` and renamed into place, so a file
is complete or absent; readers ignore dot-files. A flush counts only once its commit record (one
row: ``seq``, last ``step``, ``time``) is written after all its parts: readers skip the parts of a
flush a crash cut short, so a run reads up to its last complete flush. A file whose span of flushes
lies inside a wider file's span (a part inside a chunk, a chunk inside a bigger chunk) is ignored by
readers, so a crash between writing a merged file and deleting its inputs loses and duplicates nothing.
"""


from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

PART = re.compile(r"^part-(\d{6,})\.parquet$")
CHUNK = re.compile(r"^chunk-(\d{6,})-(\d{6,})\.parquet$")
FLUSHES = "_flushes"  # the folder of commit records under tables/


def _write_atomically(path: Path, write: Callable[[Path], None], durable: bool = False) -> None:
    """Run ``write(tmp)`` on a dot-named temporary file, then rename it to ``path``; no leftover on failure.

    ``durable``: fsync the file before the rename and the folder after it, so the file survives a power loss.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` so that the file is either complete or absent."""
    _write_atomically(path, lambda tmp: tmp.write_bytes(data), durable)


def atomic_write_json(path: Path, obj: Any, durable: bool = False) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode(), durable)


def atomic_write_parquet(path: Path, df: pd.DataFrame, durable: bool = False) -> None:
    """Write ``df`` as one zstd Parquet file, complete or absent. Converted on this thread: pyarrow would start a
    thread pool for each tall frame, which costs more than the conversion."""
    table = pa.Table.from_pandas(df, preserve_index=False, nthreads=1)
    _write_atomically(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"), durable)


def merge_parquet(files: list[Path], path: Path, durable: bool = False) -> None:
    """Stream ``files`` in order into one Parquet file at ``path``, one row group at a time."""
    schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for f in files:
                source = pq.ParquetFile(f)
                for i in range(source.num_row_groups):
                    writer.write_table(source.read_row_group(i).cast(schema))

    _write_atomically(path, write, durable)


def span(name: str) -> tuple[int, int] | None:
    """The flushes ``(first, last)`` a data file holds, from its name; None for any other name."""
    if m := CHUNK.match(name):
        return int(m[1]), int(m[2])
    if m := PART.match(name):
        return int(m[1]), int(m[1])
    return None


def committed(tables: Path, problems: list[str] | None = None) -> set[int] | None:
    """Numbers of the flushes whose commit record exists; None for a run written without commit records."""
    folder = tables / FLUSHES
    if not folder.is_dir():
        return None
    for _ in range(3):  # a concurrent merge may replace a chunk between listing and reading it: list again
        seqs: set[int] = set()
        found: list[str] = []
        vanished = False
        for f in table_files(folder):
            first, last = span(f.name)  # type: ignore[misc]
            if first == last:
                seqs.add(first)
                continue
            try:
                seqs.update(int(v) for v in pq.read_table(f, columns=["seq"]).column("seq").to_pylist())
            except FileNotFoundError:  # merged into a wider chunk meanwhile (if it stays gone: count its span)
                vanished = True
                seqs.update(range(first, last + 1))
            except Exception as err:  # unreadable: count the whole span
                seqs.update(range(first, last + 1))
                found.append(f"{f}: unreadable commit records ({type(err).__name__}); its flushes are counted")
        if not vanished:
            break
    if problems is not None:
        problems += found
    return seqs


def table_files(folder: Path, done: set[int] | None = None) -> list[Path]:
    """The data files of one table folder in flush order, skipping files inside a wider file's span and,
    when ``done`` (see :func:`committed`) is given, parts without a commit record. Chunks always count:
    only committed parts are ever merged."""
    if not folder.is_dir():
        return []
    found = [(s, f) for f in folder.iterdir()
             if (s := span(f.name)) and f.is_file() and (done is None or CHUNK.match(f.name) or s[0] in done)]
    found.sort(key=lambda t: (t[0][0], -t[0][1]))  # the widest file first among those starting together
    kept: list[Path] = []
    covered = 0
    for (_, last), f in found:
        if last > covered:
            kept.append(f)
            covered = last
    return kept




PACKAGE = Path(__file__).resolve().parent  # gatewatch/
SAMPLE_RUNS = PACKAGE.parent / "sample_runs"  # the committed sample runs of a source checkout


def read_only_run(run_dir: str | os.PathLike[str]) -> bool:
    """True for a run inside the gatewatch package or the checkout's ``sample_runs/`` (committed files): nothing
    is written into it (ablation results and summaries go elsewhere)."""
    path = Path(run_dir).resolve()
    return path.is_relative_to(PACKAGE) or path.is_relative_to(SAMPLE_RUNS)
