"""The sample runs are made by the current gatewatch: each holds every table the current version writes for the
run's own configuration (read from its run.json), its summary, and the checkpoint and trusted factory that rebuild
its model. A run made by an older version fails here: regenerate with ``python scripts/make_sample_runs.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import gatewatch as gw
from gatewatch import registry
from gatewatch.summary import SUMMARY_FILE
from gatewatch.training.model_info import CHECKPOINT_FILE, MODEL_FILE, is_trusted_factory

SAMPLE_RUNS = Path(__file__).resolve().parents[1] / "sample_runs"
RUNS = sorted(p.parent.name for p in SAMPLE_RUNS.glob("*/run.json"))
SIMILARITY_TABLES = ("similarity", "similarity_summary")
DENSE_ONLY = {"experts"}  # written for dense gates (expert utilization of the mixture), not for sparse routers


def expected_quantities(meta: dict[str, Any]) -> set[str]:
    """The quantities the current version records for the configuration in run.json (``user_config``: a
    gatewatch.training.TrainConfig, or what a script passed)."""
    config = meta.get("user_config") or {}
    want = {"gates", "losses"}
    if config.get("conflict_every"):
        want.add("conflict")
    if config.get("similarity_every", 50) != 0:  # GateWatch's default measures similarity every 50 steps
        want.add("similarity")
    if meta.get("routers"):
        want.add("routers")
    data = (config.get("data_ref") or {}).get("kwargs") or {}
    if meta.get("sample_groups") or (config.get("sample_groups") is not False and "n_domains" in data):
        want.add("groups")  # the training loop labels batches of data that carry domains
    return want


def missing(run_dir: Path) -> list[str]:
    """What ``run_dir`` lacks that the current version writes for its configuration."""
    meta = json.loads((run_dir / "run.json").read_text())
    problems = [f"no {name}" for name in (SUMMARY_FILE, MODEL_FILE, CHECKPOINT_FILE) if not (run_dir / name).is_file()]
    listed = meta.get("quantities")
    if not listed:
        return [*problems, "run.json lists no quantities (written before the quantity kit)"]
    if (run_dir / MODEL_FILE).is_file():
        model = json.loads((run_dir / MODEL_FILE).read_text())
        if not is_trusted_factory(model.get("factory") or ""):
            problems.append(f"model.json factory {model.get('factory')!r} is not a gatewatch.models factory")
        if not model.get("data"):
            problems.append("model.json has no data reference")
    problems += [f"quantity {q!r} is off (run.json quantities {listed})"
                 for q in sorted(expected_quantities(meta) - set(listed))]
    run = gw.load_run(run_dir)
    dense = {g["name"] for g in meta.get("gates") or []} - {r["gate"] for r in meta.get("routers") or []}
    for quantity in listed:
        declared = registry.declaration(quantity)
        tables = [*declared.windowed, *declared.measured, *(SIMILARITY_TABLES if quantity == "similarity" else ())]
        problems += [f"{quantity}: table {name!r} is empty" for name in tables
                     if not (name in DENSE_ONLY and not dense) and not len(run.table(name))]
    return problems


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.slow
def test_sample_run_holds_what_the_current_version_writes(name: str) -> None:
    assert not missing(SAMPLE_RUNS / name), (f"sample_runs/{name} is stale: {missing(SAMPLE_RUNS / name)}; regenerate "
                                             "it with python scripts/make_sample_runs.py")


def test_every_sample_run_is_checked() -> None:
    assert len(RUNS) >= 10 and "deepseek-routers" in RUNS and "qwen3-moe-domains" in RUNS


def test_a_run_lacking_a_table_of_its_configuration_is_stale(tmp_path: Path) -> None:
    import shutil

    source = next(SAMPLE_RUNS / n for n in RUNS if not missing(SAMPLE_RUNS / n))
    run = tmp_path / source.name
    shutil.copytree(source, run)
    for table in ("similarity", "routers", "group_routing", "conflict", "gates"):
        shutil.rmtree(run / "tables" / table, ignore_errors=True)
    (run / SUMMARY_FILE).unlink()
    found = missing(run)
    assert f"no {SUMMARY_FILE}" in found and "gates: table 'gates' is empty" in found
    assert any("'similarity' is empty" in p for p in found)
