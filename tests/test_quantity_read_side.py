"""Every registered quantity's read half, checked the same way: its declaration holds together, and a run written
without its tables (an older run, or one that had it off) still loads and reports."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import gatewatch as gw
from gatewatch import registry
from gatewatch.declarations import ReadHalf
from gatewatch.report import build_report, render_text
from gatewatch.schema import TABLES

SAMPLE_RUNS = Path(__file__).resolve().parents[1] / "sample_runs"


def sample_with(tables: list[str]) -> Path:
    """A sample run that has rows in one of ``tables`` (the first sample run when none has)."""
    runs = sorted(p for p in SAMPLE_RUNS.iterdir() if (p / "run.json").is_file())
    return next((p for p in runs if any(list((p / "tables" / t).glob("*.parquet")) for t in tables)), runs[0])


@pytest.mark.parametrize("name", registry.QUANTITIES)
def test_its_declaration_holds_together(name: str) -> None:
    half = registry.declaration(name)
    assert isinstance(half, ReadHalf)
    assert set(half.windowed) | set(half.measured) <= set(half.tables)
    for table in half.tables:
        assert TABLES[table] == half.tables[table] and "step" in half.tables[table]
    assert {s.key for s in half.sections} <= set(registry.sections())


@pytest.mark.parametrize("name", registry.QUANTITIES)
@pytest.mark.slow
def test_a_run_without_its_tables_loads_and_reports(name: str, tmp_path: Path) -> None:
    half = registry.declaration(name)
    source = sample_with(list(half.tables))
    run_dir = tmp_path / source.name
    shutil.copytree(source, run_dir)
    for table in half.tables:
        shutil.rmtree(run_dir / "tables" / table, ignore_errors=True)
    run = gw.load_run(run_dir)
    for table, columns in half.tables.items():
        assert run.table(table).empty and list(run.table(table).columns) == list(columns)
    assert not [p for p in run.problems if "not declared" in p or "not installed" in p]
    report = build_report(run)
    sections = registry.sections()
    for section in half.sections:
        assert section.key in report
        if sections[section.key].text is not None:
            render = sections[section.key].text(report[section.key], report)
            assert isinstance(render, list)
    text = render_text(report)
    assert text.startswith(f"gatewatch report: {source.name}")
    kept = gw.load_run(source)  # the other quantities' tables are read as before
    for table in set(TABLES) - set(half.tables):
        assert len(run.table(table)) == len(kept.table(table)), table


def test_a_run_listing_a_quantity_not_installed_loads_with_a_note(tmp_path: Path) -> None:
    import json

    run_dir = tmp_path / "run"
    shutil.copytree(SAMPLE_RUNS / "mmoe-polarized", run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**meta, "quantities": [*registry.QUANTITIES, "elsewhere.q"]}))
    run = gw.load_run(run_dir)
    assert run.meta["quantities"][-1] == "elsewhere.q"
    notes = [p for p in run.problems if "elsewhere.q" in p]
    assert len(notes) == 1 and "not installed" in notes[0]
    assert f"note: {notes[0]}" in render_text(build_report(run))


def test_a_section_declared_twice_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from gatewatch.declarations import Section

    twice = ReadHalf(sections=(Section("gates", lambda run, th: None),))
    real = registry.declaration
    monkeypatch.setattr(registry, "declaration", lambda name: twice if name == "twice" else real(name))
    monkeypatch.setattr(registry, "QUANTITIES", [*registry.QUANTITIES, "twice"])
    with pytest.raises(ValueError, match="'gates' and 'twice' both declare the report section 'gates'"):
        registry.sections()
    extended = ReadHalf(sections=(Section("gates", lambda run, th: "more", extends=True),))
    monkeypatch.setattr(registry, "declaration", lambda name: extended if name == "twice" else real(name))
    merged = registry.sections()
    assert merged["gates"].build(None, None) == "more" and merged["gates"].text is real("gates").sections[0].text
    assert next(iter(merged)) == "gates"  # it keeps the place of the section it extends
