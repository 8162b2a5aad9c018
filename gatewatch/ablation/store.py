"""Result files: ``RUN/ablations/<kind>.parquet``, written atomically with the settings in its metadata (for the
committed sample runs, in a results folder outside the repository: :func:`ablations_dir`)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..run_format import atomic_write_bytes, read_only_run

KINDS = ("knockout", "dropout_sweep", "train", "task_removal")
META_KEY = b"gatewatch.ablation"


def check_kind(kind: str) -> str:
    """``kind`` if it is one of :data:`KINDS`; ValueError otherwise."""
    if kind not in KINDS:
        raise ValueError(f"Unknown ablation kind {kind!r}; one of {KINDS}.")
    return kind


RESULTS_ENV = "GATEWATCH_RESULTS"


def results_root() -> Path:
    """Where ablations of runs that must stay untouched are written: ``$GATEWATCH_RESULTS``, else
    ``results/`` in the cache directory (``$GATEWATCH_CACHE`` or ``~/.cache/gatewatch``)."""
    if chosen := os.environ.get(RESULTS_ENV):
        return Path(chosen).expanduser()
    return Path(os.environ.get("GATEWATCH_CACHE") or Path.home() / ".cache" / "gatewatch").expanduser() / "results"


def ablations_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Where every ablation of a run keeps its results and jobs: ``RUN/ablations``, or, for a committed run
    (:func:`read_only_run`), ``<results_root>/<run name>-<hash of its path>/ablations`` outside the repository."""
    if not read_only_run(run_dir):
        return Path(run_dir) / "ablations"
    path = Path(run_dir).resolve()
    return results_root() / f"{path.name}-{hashlib.sha1(str(path).encode()).hexdigest()[:10]}" / "ablations"


def result_path(run_dir: str | os.PathLike[str], kind: str) -> Path:
    """``<ablations_dir(RUN)>/<kind>.parquet``."""
    return ablations_dir(run_dir) / f"{check_kind(kind)}.parquet"


def write_result(run_dir: str | os.PathLike[str], kind: str, df: pd.DataFrame, settings: Mapping[str, Any]) -> Path:
    """Write ``RUN/ablations/<kind>.parquet`` atomically, with ``settings`` in its metadata."""
    path = result_path(run_dir, kind)
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = {**(table.schema.metadata or {}), META_KEY: json.dumps({"kind": kind, **settings}, default=str).encode()}
    buffer = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buffer, compression="zstd")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def read_result(run_dir: str | os.PathLike[str], kind: str) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """The saved result of ``kind`` and its settings, or None when there is none (or it is unreadable)."""
    path = result_path(run_dir, kind)
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except Exception:  # a foreign or damaged file is shown as "no result"
        return None
    raw = (table.schema.metadata or {}).get(META_KEY, b"{}")
    try:
        settings = json.loads(raw)
    except ValueError:
        settings = {}
    return table.to_pandas(), settings
