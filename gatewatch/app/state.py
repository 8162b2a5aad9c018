"""The dashboard's logic that needs no Streamlit: the runs root, which runs may be shown, selections,
change tokens for live runs, thresholds, the one-line summaries of a run, and the Runs page's table filled in
within a time budget.

The root is fixed when the dashboard starts. Runs are only ever picked from :func:`discover` (never from a
typed path), and every file of a run must resolve inside the root: a symlink pointing out is refused.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..findings import Finding, Thresholds, gate_unit
from ..layer_names import name_pattern
from ..liveness import last_heard, run_status
from ..registry import declarations
from ..run_reader import Run, RunReadError, list_runs, read_meta
from ..summary import SUMMARY_FILE, flat_config, read_summary, summary_from_run, worst_severity

ENV_ROOT = "GATEWATCH_RUNS"
SEVERITY_COLOURS = {"error": "red", "warning": "orange", "info": "blue"}
STATUS_COLOURS = {"live": "green", "finished": "gray", "cut off": "orange"}


class OutsideRoot(Exception):
    """A run (or one of its files) lies outside the folder the dashboard was started on."""


def default_root() -> Path:
    """``sample_runs/`` of the source checkout when there is one, else ``./runs``."""
    repo_runs = Path(__file__).resolve().parents[2] / "sample_runs"  # gatewatch/app/state.py -> the checkout
    return repo_runs if repo_runs.is_dir() else Path("runs")


def root_from(argv: Sequence[str], environ: Mapping[str, str]) -> Path:
    """The runs root: ``--runs DIR`` on the command line, else ``$GATEWATCH_RUNS``, else :func:`default_root`."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--runs")
    known, _ = parser.parse_known_args(list(argv))
    chosen = known.runs or environ.get(ENV_ROOT) or default_root()
    return Path(chosen).expanduser().resolve()


@dataclass(frozen=True)
class RunRef:
    """A run below the root: ``id`` is its path relative to the root (``"."`` for the root itself)."""

    id: str
    path: Path


def inside(root: Path, path: Path) -> bool:
    """Whether ``path`` (with every symlink followed) lies in ``root``."""
    try:
        return _resolves_into(path, root.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _resolves_into(path: Path, resolved_root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(resolved_root)
    except (OSError, RuntimeError):
        return False


def outside_file(root: Path, run_path: Path, names: Sequence[str]) -> Path | None:
    """The first of the run folder and its files ``names`` that resolves outside ``root``, else None. A file that is
    not a symlink resolves into the run folder, so only the folder and the linked files are resolved: one path walk
    per run, not one per file (the Runs page checks every run on every pass)."""
    if not inside(root, run_path):
        return run_path
    return next((p for p in (run_path / name for name in names) if p.is_symlink() and not inside(root, p)), None)


def discover(root: Path) -> list[RunRef]:
    """The runs at or below ``root`` whose folder resolves inside it, sorted by id."""
    if not root.is_dir():
        return []
    refs = []
    base = root.resolve()
    for path in list_runs(root):
        if _resolves_into(path, base):
            rel = path.relative_to(root).as_posix()
            refs.append(RunRef(id=rel or ".", path=path))
    return refs


def check_inside(root: Path, run_path: Path) -> None:
    """Raise :class:`OutsideRoot` when the run folder, run.json, tables/ or any table file escapes ``root``."""
    candidates = [run_path, run_path / "run.json", run_path / "tables"]
    tables = run_path / "tables"
    if tables.is_dir():
        for folder in tables.iterdir():
            candidates.append(folder)
            if folder.is_dir():
                candidates += list(folder.iterdir())
    for p in candidates:
        if (p.exists() or p.is_symlink()) and not inside(root, p):
            raise OutsideRoot(f"{p} points outside the dashboard's folder {root}; it is not shown.")


def change_token(run_path: Path) -> tuple:
    """A cheap fingerprint that changes whenever the run writes: run.json's mtime and size, and every table
    file's name, mtime and size."""
    entries: list[tuple] = []
    for p in [run_path / "run.json"]:
        try:
            st = p.stat()
            entries.append((p.name, st.st_mtime_ns, st.st_size))
        except OSError:
            entries.append((p.name, None, None))
    tables = run_path / "tables"
    if tables.is_dir():
        for folder in sorted(tables.iterdir()):
            if not folder.is_dir():
                continue
            for f in sorted(folder.iterdir()):
                if f.name.startswith("."):
                    continue
                try:
                    st = f.stat()
                except OSError:
                    continue
                entries.append((folder.name, f.name, st.st_mtime_ns, st.st_size))
    return tuple(entries)


def _stat(file: Path) -> tuple[int, int] | None:
    try:
        st = file.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def write_stamp(run_path: Path) -> tuple:
    """The mtime and size of the run's run.json and summary.json (None when missing): the writer rewrites both at
    every flush and at close, so the stamp changes whenever the run's row on the Runs page may."""
    return _stat(run_path / "run.json"), _stat(run_path / SUMMARY_FILE)


def is_live(run_path: Path) -> bool:
    """Whether the run is live now, decided as the Runs page does: from its summary, else from run.json."""
    try:
        meta = read_summary(run_path) or read_meta(run_path)[0]
    except RunReadError:
        return False
    return run_status(meta, run_path) == "live"


def live_fingerprint(root: Path, live: Sequence[RunRef]) -> tuple:
    """What the Runs page re-checks while runs are live: the ids of the runs below ``root``, and for each live
    run its :func:`write_stamp` and whether it is still live."""
    return tuple(r.id for r in discover(root)), tuple((r.id, write_stamp(r.path), is_live(r.path)) for r in live)


def keep_known(requested: Iterable[str], available: Sequence[str]) -> list[str]:
    """The requested ids that exist, in request order, without duplicates."""
    known = set(available)
    return [r for r in dict.fromkeys(requested) if r in known]


def thresholds_from(values: Mapping[str, float]) -> Thresholds:
    """Thresholds from the sidebar inputs (unknown names are an error, missing ones keep their default)."""
    return Thresholds.from_dict(dict(values))


LISTED_LAYERS = 4  # more layers than this are said as a pattern


def layer_list(names: Sequence[str], *, routers: bool = False) -> str:
    """``layers: a, b`` for a few layers; ``48 router layers: model.layers.{0..47}.mlp.gate`` for many."""
    if len(names) <= LISTED_LAYERS:
        return "layers: " + (", ".join(names) or "-")
    return f"{len(names)} {'router layers' if routers else 'layers'}: {name_pattern(names)}"


def describe_units(run: Run) -> str:
    """``tasks: a, b`` or, for task-less gates (per-layer routers), :func:`layer_list`."""
    if gate_unit(run) == "layer":
        routers = {r.get("gate") for r in run.meta.get("routers") or [] if isinstance(r, dict)}
        return layer_list(run.gate_names, routers=bool(run.gate_names) and set(run.gate_names) <= routers)
    return "tasks: " + (", ".join(run.tasks) or "-")


def finding_badges(findings: Sequence[Finding] | Sequence[_Badge]) -> list[str]:
    """One short badge per finding code, e.g. ``"polarization x2 (error)"``, most severe first."""
    counts = Counter((f.severity, f.code) for f in findings)
    order = {"error": 0, "warning": 1, "info": 2}
    out = []
    for (severity, code), n in sorted(counts.items(), key=lambda kv: (order.get(kv[0][0], 3), kv[0][1])):
        out.append(f"{code.replace('_', ' ')}{f' x{n}' if n > 1 else ''} ({severity})")
    return out


def run_row(ref: RunRef, run: Run, findings: Sequence[Finding]) -> dict[str, object]:
    """The Runs page's row for a run read in full (one without ``summary.json``)."""
    return summary_row(ref.id, summary_from_run(run, findings), run.status, len(run.problems))


CONFIG_PREFIX = "config: "  # the Runs page's columns of config values


def summary_row(run_id: str, summary: Mapping[str, Any], status: str, problems: int | None = None
                ) -> dict[str, object]:
    """The Runs page's row of a run from its summary (:mod:`gatewatch.summary`): identity, status, worst
    severity, finding badges, shape, the last window's headline, and one column per config value."""
    gates = [g for g in summary.get("gates") or [] if isinstance(g, Mapping)]
    tasks = [g.get("task") for g in gates]
    layers = len(tasks) > 1 and all(t is None for t in tasks)
    units = [str(g.get("name")) for g in gates] if layers else [str(t) for t in summary.get("tasks") or []]
    experts = sorted({int(g["experts"]) for g in gates if isinstance(g.get("experts"), int)})
    found = summary.get("findings") if isinstance(summary.get("findings"), Mapping) else None
    counts = found.get("counts") if found and isinstance(found.get("counts"), Mapping) else {}
    head = summary.get("headline") if isinstance(summary.get("headline"), Mapping) else {}
    polar = [v.get("polarization") for v in (head.get("gates") or {}).values() if isinstance(v, Mapping)]
    polar = [p for p in polar if isinstance(p, (int, float))]
    return {
        "run": run_id, "status": status, "severity": worst_severity(summary),
        "findings": count_badges(counts) or (["healthy"] if found is not None else ["not evaluated yet"]),
        "codes": sorted(counts),
        "tasks / layers": layer_list(units) if layers else "tasks: " + (", ".join(units) or "-"),
        "gates": len(gates), "experts": ", ".join(str(e) for e in experts) or "-", "steps": summary.get("steps"),
        "max polarization": max(polar) if polar else None, "updated": summary.get("updated"),
        "problems": problems,
        **{CONFIG_PREFIX + k: v for k, v in flat_config(summary.get("config")).items()},
    }


def count_badges(counts: Mapping[str, Mapping[str, int]]) -> list[str]:
    """One badge per finding code from a summary's counts, most severe first (as :func:`finding_badges`)."""
    return finding_badges([_Badge(code, severity) for code, by in counts.items() for severity, n in by.items()
                           for _ in range(int(n))])


@dataclass(frozen=True)
class _Badge:
    code: str
    severity: str


def cut_off_message(run: Run) -> str | None:
    """The banner of a run that stopped before finishing (crash, kill, or silence)."""
    if run.status != "cut off":
        return None
    why = f" ({run.error})" if run.error else ""
    heard = last_heard(run.meta, run.path)
    since = f", last heard from {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(heard))}" if heard else ""
    return f"This run was cut off at step {run.steps}{why}{since}; showing what was written."


def finding_link(finding: Finding) -> tuple[str, dict[str, str]]:
    """The page that shows a finding (its ``chart`` when a registered quantity declares a page of that name, else
    the Overview) and the query parameters that point it at the finding's gate."""
    params = {}
    if finding.gate:
        params["gate"] = finding.gate
    shown = {page.name for _, half in declarations() for page in half.pages}
    return finding.chart if finding.chart in shown else "overview", params


READ_BUDGET_S = 2.0  # the Runs page reads runs in full for this long, then shows them and goes on
FIRST_READ_S = 0.5  # ... or for this long while it has no row to show: the table appears with its first runs sooner


@dataclass
class RunsTable:
    """The Runs page's table so far: the rows it has, why some runs cannot be shown, the runs waiting to be read."""

    rows: list[dict[str, object]]
    unreadable: list[str]
    pending: list[RunRef]


def runs_table(refs: Sequence[RunRef], row_of: Callable[[RunRef], dict[str, object] | str | None]) -> RunsTable:
    """Sort the runs by what ``row_of`` gives: a row, a message (the run cannot be shown), or None (waiting)."""
    table = RunsTable([], [], [])
    for ref in refs:
        row = row_of(ref)
        if row is None:
            table.pending.append(ref)
        elif isinstance(row, str):
            table.unreadable.append(f"`{ref.id}`: {row}")
        else:
            table.rows.append(row)
    return table


def read_budget(rows_shown: int) -> float:
    """How long the Runs page reads runs in full before it reruns to show them: :data:`FIRST_READ_S` while its table
    has no row yet, else :data:`READ_BUDGET_S` (each rerun lists every run again, so longer passes fill in faster)."""
    return READ_BUDGET_S if rows_shown else FIRST_READ_S


def read_within(pending: Sequence[RunRef], read: Callable[[RunRef], object], budget_s: float,
                clock: Callable[[], float] = time.monotonic) -> int:
    """Call ``read`` on the pending runs in order until ``budget_s`` seconds have passed (at least one run, so the
    page always moves on); the number read."""
    start, done = clock(), 0
    for ref in pending:
        if done and clock() - start >= budget_s:
            break
        read(ref)
        done += 1
    return done


def env_with_root(root: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for the Streamlit process: the caller's plus the runs root."""
    env = dict(os.environ if environ is None else environ)
    env[ENV_ROOT] = str(root)
    return env
