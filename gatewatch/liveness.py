"""Is a run still being written? Shared by the writer (what it records) and the reader (how it decides).

A watch records, in run.json, its host, pid and the process's start time, and refreshes ``heartbeat``
(seconds since the epoch) at every flush, with ``flush_secs`` and the recent ``step_time``. A run is:

* ``finished`` when its watch closed cleanly;
* ``live`` when, on this host, its process is alive with the recorded start time (a reused pid is not
  taken for it), or when its heartbeat is recent: within ``grace(meta)``, 3 x max(flush_secs, step
  time), at least ``MIN_GRACE_S`` - so a long evaluation between flushes is not taken for a crash;
* ``cut off`` otherwise: crashed, killed, or gone quiet (``since`` says when it was last heard from).
"""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

MIN_GRACE_S = 15.0
LEGACY_GRACE_S = 15 * 60  # runs written before heartbeats: no flush for this long means cut off


def process_start(pid: int) -> float | None:
    """When process ``pid`` started (clock ticks since boot, Linux), or None when unknown or not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return float(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def grace(meta: dict[str, Any]) -> float:
    """How long after its last heartbeat a run still counts as live."""
    values = [meta.get("flush_secs"), meta.get("step_time")]
    longest = max([float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)], default=0)
    return max(3 * longest, MIN_GRACE_S)


def last_heard(meta: dict[str, Any], path: Path) -> float | None:
    """Seconds since the epoch of the run's last heartbeat (``updated`` or the file time for older runs)."""
    beat = meta.get("heartbeat")
    if isinstance(beat, (int, float)) and not isinstance(beat, bool):
        return float(beat)
    try:
        return datetime.strptime(str(meta.get("updated")), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        file = path / "run.json"
        return file.stat().st_mtime if file.exists() else None


def owner_alive(meta: dict[str, Any]) -> bool | None:
    """On the run's own host: is the process that writes it alive (and the same process)? None elsewhere."""
    pid = meta.get("pid")
    if meta.get("host") != socket.gethostname() or not isinstance(pid, int):
        return None
    if not pid_alive(pid):
        return False
    started, now = meta.get("pid_start"), process_start(pid)
    return started is None or now is None or float(started) == now


def run_status(meta: dict[str, Any], path: Path) -> str:
    """``finished``, ``live`` (still being written) or ``cut off`` (crashed, killed, or gone quiet)."""
    status = meta.get("status")
    if status == "finished":
        return "finished"
    if status != "running":
        return "cut off"
    alive = owner_alive(meta)
    if alive is not None and "heartbeat" not in meta:
        return "live" if alive else "cut off"  # older runs: the pid alone
    if alive:
        return "live"
    heard = last_heard(meta, path)
    limit = grace(meta) if "heartbeat" in meta else LEGACY_GRACE_S
    if alive is False:
        return "cut off"
    return "live" if heard is not None and time.time() - heard < limit else "cut off"
