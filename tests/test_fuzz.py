"""Fuzzing the readers: whatever lies in a run directory, ``load_run`` and the report never raise.

``run.json`` gets arbitrary JSON values and random bytes; a data file of a real run is replaced by
random bytes, cut at a random length, has random bytes flipped, or becomes a real Parquet file with
foreign columns and types. The damaged file is named in ``Run.problems`` unless it still reads as a
table of the right schema, and the report of the result renders.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_mmoe, train
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gatewatch as gw
from gatewatch.report import build_report, render_text
from gatewatch.run_reader import META_TYPES
from gatewatch.schema import TABLES

EXAMPLES = int(os.environ.get("GATEWATCH_FUZZ_EXAMPLES", "60"))  # raise it for a deeper search
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_FILES = settings(FUZZ, max_examples=max(1, EXAMPLES // 2))  # each example reads a whole run

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# run.json objects that use the field names readers rely on, with values of any type
metas = st.fixed_dictionaries({}, optional={key: json_values for key in META_TYPES}) | json_values


def assert_reads(path: Path) -> gw.Run:
    """``load_run`` and the report (JSON and text) of ``path`` work; returns the run."""
    run = gw.load_run(path)
    report = build_report(run)
    json.dumps(report, allow_nan=False)
    render_text(report)
    assert isinstance(run.steps, int) and run.status in ("live", "finished", "cut off")
    for name, columns in TABLES.items():
        assert list(run.table(name).columns) == list(columns)
    return run


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A finished run whose tables are still one part per flush (8 flushes of 2 windows)."""
    path = tmp_path_factory.mktemp("fuzz") / "run"
    model = tiny_mmoe()
    with gw.GateWatch(model, tasks=model.tasks, log_dir=path, every=2, flush_every=4, tensorboard=False) as watch:
        watch.writer.compact = lambda **_: None
        train(model, watch, 32, n=8)
    return path


@pytest.mark.slow
@FUZZ
@given(meta=metas)
def test_any_json_in_run_json_reads(meta) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        (path / "run.json").write_text(json.dumps(meta))
        run = assert_reads(path)
        bad_types = isinstance(meta, dict) and any(
            key in meta and meta[key] is not None
            and (not isinstance(meta[key], kinds) or isinstance(meta[key], bool))
            for key, kinds in META_TYPES.items())
        if not isinstance(meta, dict) or bad_types:
            assert any(str(path / "run.json") in p for p in run.problems)


@pytest.mark.slow
@FUZZ
@given(data=st.binary(max_size=512))
def test_any_bytes_in_run_json_read(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        (path / "run.json").write_bytes(data)
        assert_reads(path)


def test_deeply_nested_run_json_reads(tmp_path) -> None:
    (tmp_path / "run.json").write_text("[" * 100_000 + "]" * 100_000)
    run = assert_reads(tmp_path)
    assert "RecursionError" in run.problems[0]


@contextlib.contextmanager
def damaged(real_run: Path, pick: int) -> Iterator[Path]:
    """One of the run's data files (commit records included), chosen by ``pick``; put back afterwards."""
    files = sorted((real_run / "tables").rglob("*.parquet"))
    victim = files[pick % len(files)]
    original = victim.read_bytes()
    try:
        yield victim
    finally:
        victim.write_bytes(original)


def assert_named_or_valid(run: gw.Run, victim: Path) -> None:
    """The damaged file is named in the problems, or it still reads as a valid table."""
    if not any(str(victim) in p for p in run.problems):
        table = victim.parent.name
        if table in TABLES:
            df = pq.read_table(victim).to_pandas()
            assert "step" in df.columns


@pytest.mark.slow
@FUZZ_FILES
@given(pick=st.integers(0, 10**6), damage=st.sampled_from(["random", "truncate", "flip"]), data=st.data())
def test_a_damaged_data_file_is_named_or_still_valid(real_run, pick, damage, data) -> None:
    with damaged(real_run, pick) as victim:
        raw = bytearray(victim.read_bytes())
        if damage == "random":
            raw = bytearray(data.draw(st.binary(min_size=0, max_size=2048)))
        elif damage == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        else:
            for at in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
                raw[at] ^= data.draw(st.integers(1, 255))
        victim.write_bytes(bytes(raw))
        run = assert_reads(real_run)
        assert_named_or_valid(run, victim)
        if damage != "flip" and victim.parent.name in TABLES:
            assert any(str(victim) in p for p in run.problems)


column_names = st.sampled_from(sorted({c for cols in TABLES.values() for c in cols})) | st.text(min_size=1, max_size=8)
column_values = st.one_of(
    st.lists(st.integers(-(2**63), 2**63 - 1) | st.none(), min_size=3, max_size=3),
    st.lists(st.floats() | st.none(), min_size=3, max_size=3),
    st.lists(st.text(max_size=5) | st.none(), min_size=3, max_size=3),
    st.lists(st.booleans(), min_size=3, max_size=3),
    st.lists(st.lists(st.integers(0, 9), max_size=2), min_size=3, max_size=3),
)


@pytest.mark.slow
@FUZZ_FILES
@given(pick=st.integers(0, 10**6), columns=st.dictionaries(column_names, column_values, min_size=1, max_size=6))
def test_a_foreign_parquet_file_is_named_or_valid(real_run, pick, columns) -> None:
    with damaged(real_run, pick) as victim:
        pq.write_table(pa.table(columns), victim)
        run = assert_reads(real_run)
        assert_named_or_valid(run, victim)


@pytest.mark.slow
def test_a_step_column_of_strings_is_named(real_run, tmp_path) -> None:
    path = tmp_path / "run"
    shutil.copytree(real_run, path)
    victim = path / "tables" / "gates" / "part-000001.parquet"  # windows 2 and 4
    pd.DataFrame({"step": ["one", "two"], "gate": ["ctr", "like"], "entropy": [0.5, 0.5]}).to_parquet(victim)
    run = assert_reads(path)
    assert [p for p in run.problems if str(victim) in p] == [
        p for p in run.problems if "columns of the wrong type for a 'gates' table" in p]
    assert len(run.problems) == 1 and sorted(set(run.gates["step"])) == list(range(6, 33, 2))
