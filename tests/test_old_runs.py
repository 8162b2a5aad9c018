"""Runs written before summaries: each is read in full once, its summary kept in the run (atomically) when the run
is writable and not live, else in the per-user cache keyed by the run's files; ``gatewatch summarize`` backfills a
folder; the Runs page shows the kept summaries at once and reads the rest within a time budget."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import gatewatch as gw
from gatewatch import summary_cache
from gatewatch.app import data, state
from gatewatch.run_reader import load_run
from gatewatch.summary import SUMMARY_FILE, read_summary, summary_from_run
from gatewatch.summary_cache import cache_file, cached_summary, can_write_into, summarize

SAMPLE = Path(__file__).resolve().parents[1] / "sample_runs"
OLD = ("mmoe-polarized", "mmoe-collapsed", "census-mmoe")  # sample runs, copied without summary.json


def copy_old(root: Path, names: tuple[str, ...] = OLD) -> list[Path]:
    out = []
    """Copies of sample runs ``names`` under ``root`` as runs written before summaries (no summary.json)."""
    for name in names:
        shutil.copytree(SAMPLE / name, root / name,
                        ignore=shutil.ignore_patterns("checkpoint.pt", "ablations", SUMMARY_FILE))
        out.append(root / name)
    return out


@pytest.fixture
def full_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The runs read in full by :func:`gatewatch.summary_cache.summarize`, in order."""
    seen: list[Path] = []

    def counted(path: Path) -> gw.Run:
        seen.append(Path(path))
        return load_run(path)

    monkeypatch.setattr(summary_cache, "load_run", counted)
    return seen


def make_live(path: Path) -> Path:
    """Make a copied run look like it is still being written, by this test process on this host."""
    meta = json.loads((path / "run.json").read_text())
    meta.update(status="running", ended=None, host=socket.gethostname(), pid=os.getpid(), pid_start=None)
    (path / "run.json").write_text(json.dumps(meta))
    assert load_run(path).status == "live"
    return path


@pytest.mark.slow
def test_a_folder_of_old_runs_gets_summaries_once(tmp_path: Path, full_reads: list[Path]) -> None:
    runs = copy_old(tmp_path)
    assert [summarize(p).outcome for p in runs] == ["written"] * 3 and full_reads == runs
    for path in runs:
        run = load_run(path)
        want = json.loads(json.dumps(summary_from_run(run, gw.find(run)), default=str))
        assert read_summary(path) == want  # the format the watch writes, read back
        assert not cache_file(path).exists() and not list(path.glob(".*tmp"))  # renamed into place, not cached
    mtimes = [(p / SUMMARY_FILE).stat().st_mtime_ns for p in runs]
    assert [summarize(p).outcome for p in runs] == ["had one"] * 3
    assert [s["name"] for s in gw.run_summaries(tmp_path)] == sorted(OLD)
    assert full_reads == runs  # the second pass and the listing read nothing in full
    assert [(p / SUMMARY_FILE).stat().st_mtime_ns for p in runs] == mtimes


def test_a_read_only_folder_uses_the_cache(tmp_path: Path, full_reads: list[Path]) -> None:
    (path,) = copy_old(tmp_path, ("mmoe-collapsed",))
    done = summarize(path, writable=lambda p: False)
    assert done.outcome == "cached" and not (path / SUMMARY_FILE).exists()
    assert cached_summary(path) == json.loads(json.dumps(done.summary, default=str))
    assert summarize(path, writable=lambda p: False).outcome == "had one" and full_reads == [path]
    assert [s["name"] for s in gw.run_summaries(tmp_path)] == ["mmoe-collapsed"] and full_reads == [path]
    assert not (path / SUMMARY_FILE).exists()


def test_which_folders_are_written_into(tmp_path: Path) -> None:
    (path,) = copy_old(tmp_path, ("mmoe-collapsed",))
    assert can_write_into(path)
    assert not can_write_into(SAMPLE / "mmoe-collapsed")  # committed sample runs stay untouched
    if os.geteuid() != 0:  # root writes whatever the mode says
        path.chmod(0o555)
        try:
            assert not can_write_into(path)
        finally:
            path.chmod(0o755)


def test_a_failed_write_into_the_run_goes_to_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder that looks writable but refuses the file (a read-only file system, root squash)."""
    (path,) = copy_old(tmp_path, ("mmoe-collapsed",))
    write = summary_cache.write_json

    def refuse_runs(file: Path, obj: object) -> None:
        if file.name == SUMMARY_FILE:
            raise PermissionError(13, "Permission denied", str(file))
        write(file, obj)

    monkeypatch.setattr(summary_cache, "write_json", refuse_runs)
    assert summarize(path).outcome == "cached" and not (path / SUMMARY_FILE).exists()
    assert cached_summary(path) is not None


def test_a_live_run_is_not_written_into(tmp_path: Path, full_reads: list[Path]) -> None:
    (path,) = copy_old(tmp_path, ("mmoe-polarized",))
    make_live(path)
    done = summarize(path)
    assert done.outcome == "cached" and done.summary["status"] == "running"
    assert not (path / SUMMARY_FILE).exists() and not list(path.glob(".*tmp"))
    assert summarize(path).outcome == "had one" and full_reads == [path]
    # the run writes: its cached summary no longer matches, and is computed again
    part = sorted((path / "tables" / "gates").glob("*.parquet"))[0]
    shutil.copy(part, part.with_name("part-900001.parquet"))
    assert cached_summary(path) is None
    assert summarize(path).outcome == "cached" and full_reads == [path, path]


def test_the_cache_key_changes_when_a_file_changes(tmp_path: Path) -> None:
    (path,) = copy_old(tmp_path, ("mmoe-collapsed",))
    before = summary_cache.run_key(path)
    assert before[0][0] == "run.json" and any(k[0].startswith("tables/gates/") for k in before)
    summarize(path, into_run=False)
    assert cached_summary(path) is not None
    part = sorted((path / "tables" / "losses").glob("*.parquet"))[0]
    stat = part.stat()
    os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, a later mtime
    assert summary_cache.run_key(path) != before and cached_summary(path) is None
    summarize(path, into_run=False)
    meta = json.loads((path / "run.json").read_text())
    (path / "run.json").write_text(json.dumps({**meta, "steps": meta["steps"] + 1}))  # a changed size
    assert cached_summary(path) is None
    (path / "tables" / ".part-000009.parquet.tmp-1").write_bytes(b"half written")  # temporary files do not count
    summarize(path, into_run=False)
    assert cached_summary(path) is not None
    moved = tmp_path / "elsewhere"
    shutil.copytree(path, moved)
    assert cache_file(moved) != cache_file(path) and cached_summary(moved) is None  # keyed by the path too


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gatewatch.cli", "summarize", *args], capture_output=True,
                          text=True, timeout=300, env=os.environ.copy())


def counts(out: str) -> dict[str, int]:
    lines = {line.split(":")[0].strip().split(" (")[0]: int(line.rsplit(":", 1)[1]) for line in out.splitlines()[1:5]}
    return {k.split()[0]: v for k, v in lines.items()}


@pytest.mark.slow
def test_gatewatch_summarize_backfills_a_folder(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    copy_old(runs)
    shutil.copytree(SAMPLE / "deepseek-routers", runs / "deepseek-routers")  # has its summary
    broken = runs / "nested" / "from-the-future"
    broken.mkdir(parents=True)
    (broken / "run.json").write_text(json.dumps({"format": "gatewatch-run/99", "name": "x"}))
    first = run_cli(str(runs))
    assert first.returncode == 2, first.stderr
    assert counts(first.stdout) == {"written": 3, "cached": 0, "already": 1, "failed": 1}
    assert "from-the-future" in first.stdout and "written by a newer gatewatch" in first.stdout
    assert "summarizing" in first.stderr and "5/5" in first.stderr  # the progress bar
    assert all((runs / n / SUMMARY_FILE).is_file() for n in OLD)
    shutil.rmtree(broken)
    second = run_cli(str(runs), "--quiet")
    assert second.returncode == 0 and counts(second.stdout) == {"written": 0, "cached": 0, "already": 4, "failed": 0}
    assert second.stderr == ""


@pytest.mark.slow
def test_gatewatch_summarize_cache_leaves_the_runs_untouched(tmp_path: Path) -> None:
    copy_old(tmp_path, ("mmoe-collapsed",))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = run_cli(str(tmp_path), "--cache", "--quiet")
    assert out.returncode == 0 and counts(out.stdout) == {"written": 0, "cached": 1, "already": 0, "failed": 0}
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert cached_summary(tmp_path / "mmoe-collapsed") is not None


@pytest.mark.slow
def test_gatewatch_summarize_says_what_is_wrong_with_its_folder(tmp_path: Path) -> None:
    missing = run_cli(str(tmp_path / "nope"))
    assert missing.returncode == 2 and "is not a folder" in missing.stderr
    empty = run_cli(str(tmp_path))
    assert empty.returncode == 2 and "no gatewatch run" in empty.stderr


def test_the_budget_reads_at_least_one_run_and_stops_when_spent() -> None:
    refs = [state.RunRef(str(i), Path(str(i))) for i in range(5)]
    now = [0.0]
    read: list[str] = []

    def slow(ref: state.RunRef) -> None:
        read.append(ref.id)
        now[0] += 0.7

    assert state.read_within(refs, slow, 2.0, clock=lambda: now[0]) == 3 and read == ["0", "1", "2"]
    assert state.read_within(refs[3:], slow, 0.0, clock=lambda: now[0]) == 1 and read[-1] == "3"


def test_the_first_read_is_short_while_the_table_has_no_row() -> None:
    refs = [state.RunRef(str(i), Path(str(i))) for i in range(10)]
    now = [0.0]

    def read(ref: state.RunRef) -> None:
        now[0] += 0.3

    first = state.read_within(refs, read, state.read_budget(0), clock=lambda: now[0])
    later = state.read_within(refs, read, state.read_budget(first), clock=lambda: now[0])
    assert (state.read_budget(0), state.read_budget(first)) == (state.FIRST_READ_S, state.READ_BUDGET_S)
    assert state.FIRST_READ_S < state.READ_BUDGET_S
    assert (first, later) == (2, 7)  # 0.3 s a run: 2 runs pass 0.5 s, 7 pass 2 s


def test_the_runs_page_shows_kept_summaries_at_once_and_fills_in_the_rest(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    copy_old(tmp_path)
    shutil.copytree(SAMPLE / "deepseek-routers", tmp_path / "deepseek-routers")
    refs = state.discover(tmp_path)
    reads: data.Reads = {}
    rounds = []
    while True:  # what the page does on each rerun, with no time to spare: one full read per rerun
        found = state.runs_table(refs, lambda ref: data.kept_row(tmp_path, ref, reads))
        rounds.append((len(found.rows), len(found.pending)))
        if not found.pending:
            break
        state.read_within(found.pending, lambda ref: data.read_in_full(tmp_path, ref, reads), 0.0)
    assert rounds == [(1, 3), (2, 2), (3, 1), (4, 0)] and not found.unreadable
    assert {r["run"]: r["problems"] for r in found.rows} == {"deepseek-routers": None, **dict.fromkeys(OLD, 0)}
    # a new visit: every summary is kept, nothing is read in full
    monkeypatch.setattr(summary_cache, "load_run", lambda path: pytest.fail("read a whole run"))
    again = state.runs_table(refs, lambda ref: data.kept_row(tmp_path, ref, {}))
    assert len(again.rows) == 4 and not again.pending
    assert {r["run"]: r["findings"] for r in again.rows} == {r["run"]: r["findings"] for r in found.rows}


def test_the_runs_page_names_a_run_it_cannot_read_once(tmp_path: Path, full_reads: list[Path]) -> None:
    broken = tmp_path / "from-the-future"
    broken.mkdir()
    (broken / "run.json").write_text(json.dumps({"format": "gatewatch-run/99", "name": "x"}))
    (ref,) = state.discover(tmp_path)
    reads: data.Reads = {}
    data.read_in_full(tmp_path, ref, reads)
    found = state.runs_table([ref], lambda r: data.kept_row(tmp_path, r, reads))
    assert not found.rows and not found.pending  # not read again on the next rerun
    assert len(found.unreadable) == 1 and "written by a newer gatewatch" in found.unreadable[0]


def test_a_row_whose_run_or_files_link_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    (run,) = copy_old(root, ("mmoe-polarized",))
    shutil.copytree(SAMPLE / "deepseek-routers", elsewhere / "deepseek-routers")
    summary_from_elsewhere = elsewhere / "deepseek-routers" / SUMMARY_FILE
    (root / "linked").mkdir()
    (root / "linked" / "run.json").symlink_to(run / "run.json")  # a link that stays inside the root: allowed
    (root / "linked" / SUMMARY_FILE).symlink_to(summary_from_elsewhere)
    (root / "linked-out").symlink_to(elsewhere / "deepseek-routers", target_is_directory=True)
    refs = [state.RunRef("mmoe-polarized", run), state.RunRef("linked", root / "linked"),
            state.RunRef("linked-out", root / "linked-out")]
    names = (SUMMARY_FILE, "run.json")
    # the reference: every path resolved, one by one
    for ref in refs:
        want = next((p for p in (ref.path, *(ref.path / n for n in names))
                     if (p.exists() or p.is_symlink()) and not state.inside(root, p)), None)
        assert state.outside_file(root, ref.path, names) == want
    assert [state.outside_file(root, ref.path, names) for ref in refs] == [
        None, root / "linked" / SUMMARY_FILE, root / "linked-out"]
    found = state.runs_table(refs, lambda ref: data.kept_row(root, ref, {}))
    assert [r for r in found.unreadable if "points outside the dashboard's folder" in r] == [
        f"`linked`: {root / 'linked' / SUMMARY_FILE} points outside the dashboard's folder {root}; it is not shown.",
        f"`linked-out`: {root / 'linked-out'} points outside the dashboard's folder {root}; it is not shown."]
    assert found.pending == [refs[0]]  # the plain run waits to be read in full
