"""Read run directories into pandas: ``load_run(path) -> Run``.

Reading is tolerant: a run that is still being written, or was cut off by a crash, reads up to its
last complete flush; a corrupt, truncated or foreign file is skipped and named in ``Run.problems``,
and so is a ``run.json`` field of the wrong type. Reading never leaves the run directory: a file
that is a symbolic link to somewhere outside it is skipped. A run written by a quantity that is not installed
here still loads: its tables come as they were written (no schema), and a note in ``Run.problems`` says which
quantity or table is unknown and what to install.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from . import __version__, registry
from .liveness import run_status
from .loaded_run import Run
from .run_format import FLUSHES, PART, committed, table_files
from .schema import RUN_FORMAT, TABLES, conform, frame


class RunReadError(Exception):
    """The folder is not a readable gatewatch run; the message says why and what to do."""


# The run.json fields readers rely on, and their JSON types; a field of another type is dropped.
META_TYPES: dict[str, tuple[type, ...]] = {
    "format": (str,), "name": (str,), "status": (str,), "created": (str,), "updated": (str,), "ended": (str,),
    "error": (str,), "steps": (int,), "tasks": (list,), "gates": (list,), "model_class": (str,),
    "versions": (dict,), "config": (dict,), "user_config": (dict,), "host": (str,), "pid": (int,),
    "world_size": (int,), "quantities": (list,),
}
MAX_META_BYTES = 16 * 2**20


def inside(file: Path, root: Path) -> bool:
    """True when ``file`` (after following symbolic links) lies in ``root``."""
    try:
        return file.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a link loop
        return False


def read_meta(path: Path) -> tuple[dict[str, Any], list[str]]:
    """``run.json`` as a dict, or a minimal stand-in and a problem when it is missing or corrupt."""
    file = path / "run.json"
    try:
        if not inside(file, path):
            raise ValueError("it links outside the run directory")
        if file.stat().st_size > MAX_META_BYTES:
            raise ValueError(f"larger than {MAX_META_BYTES} bytes")
        meta = json.loads(file.read_bytes())
        if not isinstance(meta, dict):
            raise ValueError("top level is not a JSON object")
    except FileNotFoundError:
        return {"name": path.name}, [f"{file}: missing; the run's metadata is unknown"]
    except (OSError, ValueError, RecursionError) as err:
        return {"name": path.name}, [f"{file}: unreadable ({type(err).__name__}: {err}); skipped"]
    problems = []
    newer = re.fullmatch(r"gatewatch-run/(\d+)", str(meta.get("format")))
    if newer and int(newer[1]) > int(RUN_FORMAT.rsplit("/", 1)[1]):
        raise RunReadError(f"{path} was written by a newer gatewatch (run format {meta['format']}; this gatewatch "
                           f"{__version__} reads {RUN_FORMAT}). Upgrade to read it: pip install --upgrade gatewatch")
    if meta.get("format") != RUN_FORMAT:
        problems.append(f"{file}: format {meta.get('format')!r:.40}, expected {RUN_FORMAT!r}; read as far as possible")
    for key, kinds in META_TYPES.items():
        value = meta.get(key)
        if value is None or (isinstance(value, kinds) and not isinstance(value, bool)):
            continue
        problems.append(f"{file}: {key!r} is a {type(value).__name__}, not a {kinds[0].__name__}; ignored")
        meta[key] = None
    if isinstance(meta.get("pid"), int) and not 0 < meta["pid"] < 2**31:
        problems.append(f"{file}: 'pid' {meta['pid']} is not a process id; ignored")
        meta["pid"] = None
    if meta.get("tasks") is not None:
        meta["tasks"] = [str(t) for t in meta["tasks"] if isinstance(t, (str, int, float)) and not isinstance(t, bool)]
    if meta.get("gates") is not None:
        meta["gates"] = [g for g in meta["gates"] if isinstance(g, dict) and isinstance(g.get("name"), str)]
    if meta.get("quantities") is not None:
        meta["quantities"] = [str(q) for q in meta["quantities"] if isinstance(q, str)]
    return meta, problems


class _Unusable(Exception):
    """A file of a table that cannot be used; the message says why."""


def _read_file(f: Path, name: str, root: Path, problems: list[str]) -> pd.DataFrame:
    """One data file of table ``name``, conformed to its schema; raises :class:`_Unusable` (or FileNotFoundError)."""
    if not inside(f, root):
        raise _Unusable("it links outside the run directory")
    try:
        df = pq.read_table(f).to_pandas()
    except FileNotFoundError:
        raise
    except Exception as err:  # corrupt, truncated, foreign
        raise _Unusable(f"not a readable Parquet file ({type(err).__name__}: {err})") from err
    if "step" not in df.columns or not set(df.columns) & set(TABLES[name]) - {"step"}:
        raise _Unusable(f"not a gatewatch {name!r} table (columns {[str(c) for c in df.columns][:6]})")
    try:
        df = conform(name, df)
    except Exception as err:  # columns of the wrong type
        raise _Unusable(f"columns of the wrong type for a {name!r} table ({type(err).__name__}: {err})") from err
    required = [c for c, kind in TABLES[name].items() if kind == "int64"]
    incomplete = df[required].isna().any(axis=1)
    if incomplete.all():
        raise _Unusable(f"no row has all of {required}")
    if incomplete.any():
        problems.append(f"{f}: {int(incomplete.sum())} rows lack one of {required}; those rows skipped")
        df = df[~incomplete].astype({c: "int64" for c in required}).reset_index(drop=True)
    return df


def _uncommitted(folder: Path, name: str, done: set[int] | None) -> list[str]:
    """Problems naming the parts of flushes that have no commit record (cut short, or being written now)."""
    if done is None or not folder.is_dir():
        return []
    out = []
    for f in sorted(folder.iterdir()):
        if (m := PART.match(f.name)) and int(m[1]) not in done:
            try:
                _read_file(f, name, folder.parent.parent, [])
                why = "its flush has no commit record (cut short by a crash, or still being written)"
            except (_Unusable, OSError) as err:
                why = f"{err}, and its flush has no commit record"
            out.append(f"{f}: {why}; skipped")
    return out


def read_table(folder: Path, name: str, problems: list[str], done: set[int] | None = None) -> pd.DataFrame:
    """All complete files of one table, conformed to its schema; bad files are skipped and reported.

    ``done``: the committed flushes (see :func:`gatewatch.run_format.committed`); parts of other
    flushes were cut short by a crash and are left out.
    """
    root = folder.parent.parent
    for _ in range(3):  # a concurrent compaction may remove parts between listing and reading
        frames, found, missing = [], [], False
        for f in table_files(folder, done):
            try:
                frames.append(_read_file(f, name, root, found))
            except FileNotFoundError:
                missing = True
                break
            except _Unusable as err:
                found.append(f"{f}: {err}; skipped")
        if not missing:
            break
    problems += found + _uncommitted(folder, name, done)
    if not frames:
        return frame(name)
    return pd.concat(frames, ignore_index=True).sort_values("step", kind="stable").reset_index(drop=True)


def is_run(path: Path) -> bool:
    return (path / "run.json").is_file() or (path / "tables").is_dir()


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read a run directory. Raises :class:`RunReadError` only when ``path`` is not a run at all."""
    path = Path(path)
    if not path.is_dir():
        raise RunReadError(f"{path} is not a folder. Pass the run directory given to GateWatch(log_dir=...).")
    if not is_run(path):
        raise RunReadError(
            f"{path} is not a gatewatch run: it has neither run.json nor tables/. Pass the run directory given "
            "to GateWatch(log_dir=...), or a folder of runs to the dashboard."
        )
    meta, problems = read_meta(path)
    done = committed(path / "tables", problems)
    tables = {name: read_table(path / "tables" / name, name, problems, done) for name in TABLES}
    for name in unknown_tables(path):
        tables[name] = read_plain(path / "tables" / name, problems, done)
    problems += unknown_quantities(meta, list(tables))
    return Run(path=path, meta=meta, tables=tables, status=run_status(meta, path), problems=problems)


def unknown_tables(path: Path) -> list[str]:
    """The table folders of a run that no installed quantity declares, by name."""
    folder = path / "tables"
    if not folder.is_dir():
        return []
    return sorted(f.name for f in folder.iterdir()
                  if f.is_dir() and f.name not in TABLES and f.name != FLUSHES and not f.name.startswith((".", "_")))


def read_plain(folder: Path, problems: list[str], done: set[int] | None) -> pd.DataFrame:
    """All complete files of a table no installed quantity declares, as they were written (sorted by ``step``
    when it has one); unreadable files are skipped and reported."""
    frames = []
    for f in table_files(folder, done):
        try:
            if not inside(f, folder.parent.parent):
                raise ValueError("it links outside the run directory")
            frames.append(pq.read_table(f).to_pandas())
        except Exception as err:  # corrupt, truncated, foreign, removed meanwhile
            problems.append(f"{f}: unreadable ({type(err).__name__}: {err}); skipped")
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values("step", kind="stable").reset_index(drop=True) if "step" in df else df


def unknown_quantities(meta: dict[str, Any], tables: list[str]) -> list[str]:
    """Notes for the quantities that wrote the run (run.json's ``quantities``; absent in older runs) and the
    tables that no installed quantity knows."""
    notes = [f"quantity {name!r} wrote this run but is not installed here: its tables load as written, without "
             "its report sections, findings or pages. Install the package that provides it (it registers itself "
             "through the 'gatewatch.quantities' entry point)."
             for name in meta.get("quantities") or [] if name not in registry.QUANTITIES]
    notes += [f"table {name!r} is not declared by any installed quantity: loaded as written (Run.table({name!r}))"
              for name in tables if name not in TABLES]
    return notes


def list_runs(root: str | os.PathLike[str]) -> list[Path]:
    """Run directories at or below ``root`` (hidden folders skipped), sorted by path."""
    root = Path(root)
    found: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in ("tables", "tensorboard"))
        if is_run(Path(dirpath)):
            found.append(Path(dirpath))
    return found
