"""Ablations of the committed sample runs are written to a results folder outside the repository and read back
from there; ablations of any other run stay next to it (``RUN/ablations``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gatewatch.ablation import read_result
from gatewatch.ablation.store import RESULTS_ENV, ablations_dir, results_root
from gatewatch.cli import main
from gatewatch.run_format import read_only_run

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_runs" / "mmoe-p0.5"


def test_committed_runs_get_a_results_folder_outside_the_repository(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "results"))
    assert read_only_run(SAMPLE) and not read_only_run(tmp_path / "run")
    folder = ablations_dir(SAMPLE)
    assert folder.is_relative_to(tmp_path / "results") and not folder.resolve().is_relative_to(REPO)
    assert folder != ablations_dir(REPO / "sample_runs" / "mmoe-polarized")  # one folder per run
    assert ablations_dir(tmp_path / "run") == tmp_path / "run" / "ablations"
    monkeypatch.delenv(RESULTS_ENV)
    monkeypatch.setenv("GATEWATCH_CACHE", str(tmp_path / "cache"))
    assert results_root() == tmp_path / "cache" / "results"


def test_a_sweep_of_a_sample_run_writes_nothing_into_the_repository(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "results"))
    before = sorted(p.relative_to(SAMPLE) for p in SAMPLE.rglob("*"))
    assert main(["ablate", str(SAMPLE), "--dropout-sweep", "0,0.5", "--seeds", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert sorted(p.relative_to(SAMPLE) for p in SAMPLE.rglob("*")) == before  # nothing new in the repository
    df, settings = read_result(SAMPLE, "dropout_sweep")  # read back from the results folder
    assert len(df) == len(rows) and sorted(df["rate"].unique()) == [0.0, 0.5] and settings["kind"] == "dropout_sweep"
    assert (ablations_dir(SAMPLE) / "dropout_sweep.parquet").is_file()
