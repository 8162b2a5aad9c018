"""run.json as the watch keeps it, and the claim on a run directory (one open watch per folder)."""

from __future__ import annotations

import json
import os
import platform
import socket
import time
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..liveness import owner_alive, process_start
from ..schema import RUN_FORMAT

# The open watches of this process by run directory: two open watches must not write one folder.
_OPEN: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def initial_meta(name: str, model: Any, settings: Mapping[str, Any], config: Mapping[str, Any] | None,
                 world_size: int, quantities: list[str] | None = None) -> dict[str, Any]:
    """The run.json of a run that starts now; ``quantities``: the registry names of the quantities that write it
    (a third-party one by its dotted package, so that readers in other processes can import its read half)."""
    stamp = now()
    return {
        "format": RUN_FORMAT, "name": name, "status": "running", "created": stamp, "updated": stamp, "ended": None,
        "error": None, "steps": 0, "tasks": None, "gates": [],
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "versions": {"gatewatch": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "config": dict(settings), "user_config": dict(config or {}), "host": socket.gethostname(),
        "pid": os.getpid(), "pid_start": process_start(os.getpid()), "world_size": world_size,
        "heartbeat": time.time(), "quantities": list(quantities or []),
    }


MERGED = {"per_expert_every"}  # run.json keys of several quantities: {table: windows between per-expert rows}


def refresh(meta: dict[str, Any], quantities: list[Any], **fields: Any) -> dict[str, Any]:
    """``meta`` with every quantity's fields, ``fields``, the time and a fresh heartbeat."""
    for q in quantities:
        fields_of = q.describe()
        for key in MERGED & fields_of.keys():  # filled in by several quantities: each adds its own entries
            fields_of[key] = {**(meta.get(key) or {}), **fields_of[key]}
        meta.update(fields_of)
    meta.update(fields, updated=now(), heartbeat=time.time())
    return meta


def _key(log_dir: Path) -> str:
    return str(log_dir.expanduser().resolve())


def claim(log_dir: Path, watch: Any, *, writer: bool) -> None:
    """Take ``log_dir`` for ``watch``; refuse a folder another open watch writes, in this process or another.

    Warns when the folder already holds a finished or cut-off run (its rows are added to).
    """
    if log_dir.exists() and not log_dir.is_dir():
        raise ValueError(f"log_dir {log_dir} is a file, not a folder. Pass a folder path for the run directory "
                         "(it is created), e.g. log_dir='runs/exp1'.")
    other = _OPEN.get(_key(log_dir))
    if other is not None and not other.closed:
        raise ValueError(f"Another GateWatch that is still open writes to {log_dir}. Close it first (watch.close()), "
                         "or give this one its own log_dir.")
    if writer:
        _check_other_process(log_dir)
    _OPEN[_key(log_dir)] = watch


def _check_other_process(log_dir: Path) -> None:
    try:
        meta = json.loads((log_dir / "run.json").read_bytes())
    except (OSError, ValueError):
        return
    if not isinstance(meta, dict):
        return
    if meta.get("status") == "running" and meta.get("pid") != os.getpid() and owner_alive(meta):
        raise ValueError(f"{log_dir} is being written by another process (pid {meta.get('pid')}, a GateWatch that is "
                         "still open). Give this run its own log_dir, or stop the other process first.")
    warnings.warn(f"{log_dir} already holds a run; the new rows are added to it and their steps count from 1 again. "
                  "Give each run (and each resumed run) its own log_dir to keep them apart.", UserWarning, stacklevel=4)
