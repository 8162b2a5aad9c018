"""Read run directories into pandas: ``load_run(path) -> Run``.

Reading is tolerant: a run that is still being written, or was cut off by a crash, reads up to its
last complete flush; a corrupt, truncated or foreign file is skipped and named in ``Run.problems``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from .schema import RUN_FORMAT, TABLES, conform, frame
from .sinks.run_dir import table_files

STALE_AFTER_S = 15 * 60  # a run on another host with no flush for this long is taken as cut off


class RunReadError(Exception):
    """The folder is not a readable gatewatch run; the message says why and what to do."""


@dataclass
class Run:
    """One run directory: metadata, tidy tables (see :mod:`gatewatch.schema`) and read problems."""

    path: Path
    meta: dict[str, Any]
    tables: dict[str, pd.DataFrame]
    status: str  # "live" | "finished" | "cut off"
    problems: list[str] = field(default_factory=list)

    def table(self, name: str) -> pd.DataFrame:
        return self.tables[name] if name in self.tables else frame(name)

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.path.name)

    @property
    def gates(self) -> pd.DataFrame:
        return self.table("gates")

    @property
    def shares(self) -> pd.DataFrame:
        return self.table("shares")

    @property
    def hist(self) -> pd.DataFrame:
        return self.table("hist")

    @property
    def experts(self) -> pd.DataFrame:
        return self.table("experts")

    @property
    def losses(self) -> pd.DataFrame:
        return self.table("losses")

    @property
    def events(self) -> pd.DataFrame:
        return self.table("events")

    @property
    def tasks(self) -> list[str]:
        return list(self.meta.get("tasks") or [])

    @property
    def gate_names(self) -> list[str]:
        names = [g["name"] for g in self.meta.get("gates", []) if isinstance(g, dict) and "name" in g]
        return names or sorted(self.gates["gate"].dropna().unique().tolist())

    @property
    def steps(self) -> int:
        """The last training step the run reached (from run.json, or the tables if it is older)."""
        last = [int(df["step"].max()) for df in self.tables.values() if len(df) and "step" in df]
        return max([int(self.meta.get("steps") or 0), *last])

    @property
    def error(self) -> str | None:
        return self.meta.get("error")


def read_meta(path: Path) -> tuple[dict[str, Any], list[str]]:
    """``run.json`` as a dict, or a minimal stand-in and a problem when it is missing or corrupt."""
    file = path / "run.json"
    try:
        meta = json.loads(file.read_text())
        if not isinstance(meta, dict):
            raise ValueError("top level is not a JSON object")
    except FileNotFoundError:
        return {"name": path.name}, [f"{file}: missing; the run's metadata is unknown"]
    except (OSError, ValueError) as err:
        return {"name": path.name}, [f"{file}: unreadable ({err}); skipped"]
    problems = []
    if meta.get("format") != RUN_FORMAT:
        problems.append(f"{file}: format {meta.get('format')!r}, expected {RUN_FORMAT!r}; read as far as possible")
    for key, kind in (("tasks", list), ("gates", list), ("config", dict)):
        if key in meta and meta[key] is not None and not isinstance(meta[key], kind):
            problems.append(f"{file}: {key!r} is not a {kind.__name__}; ignored")
            meta[key] = None
    return meta, problems


def read_table(folder: Path, name: str, problems: list[str]) -> pd.DataFrame:
    """All complete files of one table, conformed to its schema; bad files are skipped and reported."""
    for _ in range(3):  # a concurrent compaction may remove parts between listing and reading
        frames, missing = [], False
        for f in table_files(folder):
            try:
                df = pq.read_table(f).to_pandas()
            except FileNotFoundError:
                missing = True
                break
            except Exception as err:  # corrupt, truncated, foreign
                problems.append(f"{f}: not a readable Parquet file ({type(err).__name__}: {err}); skipped")
                continue
            absent = [c for c in ("step",) if c not in df.columns]
            if absent or not set(df.columns) & set(TABLES[name]) - {"step"}:
                problems.append(f"{f}: not a gatewatch {name!r} table (columns {list(df.columns)[:6]}); skipped")
                continue
            frames.append(conform(name, df))
        if not missing:
            break
    if not frames:
        return frame(name)
    return pd.concat(frames, ignore_index=True).sort_values("step", kind="stable").reset_index(drop=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def run_status(meta: dict[str, Any], path: Path) -> str:
    """``finished``, ``live`` (still being written) or ``cut off`` (crashed, killed, or gone quiet)."""
    status = meta.get("status")
    if status == "finished":
        return "finished"
    if status != "running":
        return "cut off"
    if meta.get("host") == socket.gethostname() and isinstance(meta.get("pid"), int):
        return "live" if _pid_alive(meta["pid"]) else "cut off"
    try:
        updated = datetime.strptime(str(meta.get("updated")), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        updated = (path / "run.json").stat().st_mtime if (path / "run.json").exists() else 0
    return "live" if time.time() - updated < STALE_AFTER_S else "cut off"


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
    tables = {name: read_table(path / "tables" / name, name, problems) for name in TABLES}
    return Run(path=path, meta=meta, tables=tables, status=run_status(meta, path), problems=problems)


def list_runs(root: str | os.PathLike[str]) -> list[Path]:
    """Run directories at or below ``root`` (hidden folders skipped), sorted by path."""
    root = Path(root)
    found: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in ("tables", "tensorboard"))
        if is_run(Path(dirpath)):
            found.append(Path(dirpath))
    return found
