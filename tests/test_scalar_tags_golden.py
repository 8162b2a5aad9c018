"""The TensorBoard tags and tracker metric names are a user contract: charts, alerts and dashboards are built on
them. This test pins them for every sample run (plus a conflict-proxy table, which no sample run has) against
tests/scalar_tags.json, written from the code before the scalars moved into the quantities' read halves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import gatewatch as gw
from gatewatch.schema import frame
from gatewatch.sinks.mlflow import mlflow_name
from gatewatch.sinks.scalars import scalars
from gatewatch.sinks.tensorboard import TensorBoardSink

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("scalar_tags.json")
RUNS = sorted(p.name for p in (ROOT / "sample_runs").iterdir() if (p / "run.json").is_file())


def proxy_rows() -> pd.DataFrame:
    """A small ``conflict_proxy`` table: two steps x two expert modules of one task pair."""
    return frame("conflict_proxy", [
        {"step": step, "name": f"experts.{e}", "task_a": "ctr", "task_b": "like", "cosine": 0.1 * e - 0.05 * step,
         "norm_a": 1.0, "norm_b": 2.0, "below": step, "zero_grad": False} for step in (1, 2) for e in (0, 1)])


def tables_of(name: str) -> dict[str, pd.DataFrame]:
    tables = dict(gw.load_run(ROOT / "sample_runs" / name).tables)
    if name == "census-mmoe":
        tables["conflict_proxy"] = proxy_rows()
    return tables


def observed(name: str, tmp_path: Path) -> dict[str, Any]:
    """The tags of one flush of the whole run: trackers' (every window), TensorBoard's (thinned, read back)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tables = tables_of(name)
    found = scalars(tables)
    tags = sorted({tag for tag, _, _ in found})
    sink = TensorBoardSink(tmp_path / name)
    assert sink.write(tables)
    sink.close()
    events = EventAccumulator(str(tmp_path / name), size_guidance={"scalars": 0})
    events.Reload()
    board = sorted(events.Tags()["scalars"])
    steps = sorted({e.step for tag in board for e in events.Scalars(tag)})
    return {"tags": tags, "scalars": len(found), "tensorboard_tags": board, "tensorboard_steps": steps,
            "mlflow": sorted(mlflow_name("gatewatch/" + tag) for tag in tags)}


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.slow
def test_tags_and_metric_names_are_unchanged(name: str, tmp_path: Path) -> None:
    want = json.loads(GOLDEN.read_text())[name]
    got = observed(name, tmp_path)
    for key in want:
        assert got[key] == want[key], key


def test_every_sample_run_is_pinned() -> None:
    assert sorted(json.loads(GOLDEN.read_text())) == RUNS
