"""Summaries of runs without ``summary.json`` (written before summaries): computed once from a full read, then kept.

A computed summary is written into the run as ``summary.json`` (a temporary file renamed into place) when the run
is not live, its folder is writable and it is not a committed sample run (:func:`gatewatch.ablation.store.
read_only_run`). Otherwise it goes to a per-user cache: ``$GATEWATCH_SUMMARIES``, else ``summaries/`` in the cache
directory (``$GATEWATCH_CACHE`` or ``~/.cache/gatewatch``). The cache holds one file per run, named by a hash of the
run's path, with the run's key: the path, size and mtime of run.json and of every file below ``tables/``. A cached
summary whose key no longer matches the run is computed again. The summary's format is :mod:`gatewatch.summary`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .findings import find
from .liveness import run_status
from .run_format import read_only_run
from .run_reader import list_runs, load_run
from .summary import MAX_SUMMARY_BYTES, SUMMARY_FILE, SUMMARY_FORMAT, read_summary, summary_from_run

SUMMARIES_ENV = "GATEWATCH_SUMMARIES"
CACHE_FORMAT = "gatewatch-summary-cache/1"


def cache_dir() -> Path:
    """``$GATEWATCH_SUMMARIES``, else ``summaries/`` in ``$GATEWATCH_CACHE`` or ``~/.cache/gatewatch``."""
    if chosen := os.environ.get(SUMMARIES_ENV):
        return Path(chosen).expanduser()
    return Path(os.environ.get("GATEWATCH_CACHE") or Path.home() / ".cache" / "gatewatch").expanduser() / "summaries"


def cache_file(path: Path) -> Path:
    """The cache file of the run at ``path`` (named by a hash of its resolved path)."""
    return cache_dir() / f"{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:24]}.json"


def run_key(path: Path) -> list[list[Any]]:
    """``[relative path, size, mtime_ns]`` of run.json and of every file below ``tables/`` (dot-named temporary
    files left out): what a full read depends on, so any write to the run changes it."""
    files = [path / "run.json"]
    for folder, subfolders, names in os.walk(path / "tables"):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        files += [Path(folder) / n for n in sorted(names) if not n.startswith(".")]
    key = []
    for file in files:
        try:
            stat = file.stat()
        except OSError:  # missing, or removed by a compaction since the listing
            continue
        key.append([file.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns])
    return key


def cached_summary(path: Path) -> dict[str, Any] | None:
    """The cached summary of the run at ``path``, or None when there is none or the run changed since."""
    file = cache_file(path)
    try:
        if file.stat().st_size > MAX_SUMMARY_BYTES + 2**20:
            return None
        entry = json.loads(file.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT or entry.get("path") != str(path.resolve()):
        return None
    summary = entry.get("summary")
    if not isinstance(summary, dict) or summary.get("format") != SUMMARY_FORMAT:
        return None
    return summary if entry.get("key") == run_key(path) else None


def kept_summary(path: Path) -> dict[str, Any] | None:
    """The run's ``summary.json``, else its up-to-date cached summary, else None."""
    return read_summary(path) or cached_summary(path)


def can_write_into(path: Path) -> bool:
    """Whether a summary may be written into the run's folder: writable, and not a committed sample run."""
    return os.access(path, os.W_OK) and not read_only_run(path)


def write_json(file: Path, obj: Any) -> None:
    """Write ``obj`` to ``file`` as JSON: a dot-named temporary file in the same folder, renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write((json.dumps(obj, indent=2, default=str) + "\n").encode())
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class Summarized:
    """A run's summary and where it is kept.

    ``outcome``: ``"had one"`` (its summary.json or an up-to-date cache entry), ``"written"`` (computed now, written
    into the run), ``"cached"`` (computed now, written to the cache) or ``"not kept"`` (computed now; ``why`` says
    why neither could be written). ``problems``: the unreadable files the full read found (None when not read now).
    """

    summary: dict[str, Any]
    outcome: str
    problems: int | None = None
    why: str | None = None


def summarize(path: Path, *, into_run: bool = True, writable: Callable[[Path], bool] | None = None) -> Summarized:
    """The summary of the run at ``path``: the one kept, else computed from a full read (findings at the default
    thresholds) and kept: into the run when ``into_run``, the run is not live and ``writable(path)`` (default
    :func:`can_write_into`), else in the cache. Raises :class:`gatewatch.run_reader.RunReadError` when ``path`` is not a
    run."""
    path = Path(path)
    if (kept := kept_summary(path)) is not None:
        return Summarized(kept, "had one")
    key = run_key(path)  # before the read: a write during the read leaves a key that no longer matches
    run = load_run(path)
    summary = summary_from_run(run, find(run))
    problems = len(run.problems)
    if into_run and run.status != "live" and (writable or can_write_into)(path):
        try:
            write_json(path / SUMMARY_FILE, summary)
            return Summarized(summary, "written", problems)
        except OSError:
            pass  # read-only after all (a read-only file system, or a folder root may not write to): cache it
    try:
        cache_summary(path, summary, key)
    except OSError as err:
        return Summarized(summary, "not kept", problems, f"cannot write the cache file {cache_file(path)} ({err}); "
                                                         f"set {SUMMARIES_ENV} to a writable folder")
    return Summarized(summary, "cached", problems)


def cache_summary(path: Path, summary: dict[str, Any], key: list[list[Any]]) -> None:
    """Write the run's summary to its cache file, under ``key`` (:func:`run_key`, taken before the run was read);
    OSError when the cache cannot be written."""
    file = cache_file(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    write_json(file, {"format": CACHE_FORMAT, "path": str(path.resolve()), "key": key, "summary": summary})


def run_summaries(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The summary of every run at or below ``root`` (:mod:`gatewatch.summary`), with ``path`` and the ``status``
    the reader decides (``live``, ``finished``, ``cut off``). A run's ``summary.json`` is read alone; a run without
    one (written before summaries) is read in full once, its findings evaluated at the default thresholds, and its
    summary kept, in the run or in the per-user cache (:mod:`gatewatch.summary_cache`)."""
    out = []
    for path in list_runs(root):
        summary = summarize(path).summary
        out.append({**summary, "path": str(path), "status": run_status(summary, path)})
    return out
