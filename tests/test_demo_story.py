"""The demo's story: a healthy MMoE and one chosen to polarize, trained side by side, the sample runs next to them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import gatewatch as gw
from gatewatch import cli
from gatewatch.data.census import cached_splits_path, fetch_archive
from gatewatch.demo.story import SAMPLE_RUNS, copy_sample_runs, story_configs
from gatewatch.summary import read_summary


def test_the_story_trains_the_setting_that_polarizes_next_to_a_healthy_one() -> None:
    configs = story_configs(2000)
    (polar, note), (healthy, _) = configs["polarizing-mmoe"], configs["healthy-mmoe"]
    assert (polar.data, polar.model_kwargs, polar.lr) == ("census", {"n_experts": 4}, 1e-2)
    assert (healthy.data, healthy.model_kwargs, healthy.lr) == ("census", {"n_experts": 8}, 1e-3)
    assert polar.seed == healthy.seed and "Chosen to polarize" in note and "6 of 10 seeds" in note
    assert cli.build_parser().parse_args(["demo", "--quick"]).quick


def test_the_sample_runs_are_copied_next_to_the_new_ones_once(tmp_path: Path) -> None:
    copied = copy_sample_runs(tmp_path)
    assert copied == tmp_path / "sample_runs"
    names = sorted(p.name for p in SAMPLE_RUNS.iterdir() if p.is_dir())
    assert sorted(p.name for p in copied.iterdir()) == names
    assert not list(copied.rglob("ablations"))
    (copied / names[0] / "marker").write_text("kept")
    assert copy_sample_runs(tmp_path) == copied and (copied / names[0] / "marker").exists()  # not copied again


@pytest.mark.slow  # two training processes on census-income
def test_the_quick_demo_shows_the_polarization_of_the_chosen_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    start = time.monotonic()
    assert cli.main(["demo", "--quick", "--no-dashboard", "--out", str(tmp_path)]) == 0
    seconds = time.monotonic() - start
    printed = capsys.readouterr().out
    (batch,) = tmp_path.glob("demo-*")
    runs = {p.name: gw.load_run(p) for p in batch.iterdir()}
    assert set(runs) == {"polarizing-mmoe", "healthy-mmoe"}
    for name, run in runs.items():
        assert run.status == "finished" and run.steps == 300 and (batch / name / "checkpoint.pt").is_file()
    polar = runs["polarizing-mmoe"]
    found = [f for f in gw.find(polar) if f.code == "polarization"]
    assert found and found[0].step <= 300 and found[0].severity == "error"
    assert "Chosen to polarize" in polar.meta["note"]
    assert not [f for f in gw.find(runs["healthy-mmoe"]) if f.code == "polarization"]
    assert "polarization" in read_summary(batch / "polarizing-mmoe")["findings"]["counts"]
    assert "remedy:" in printed and "is polarized" in printed
    assert (tmp_path / "sample_runs" / "mmoe-polarized" / "run.json").is_file()
    assert json.loads((batch / "healthy-mmoe" / "run.json").read_text())["user_config"]["lr"] == 1e-3
    archive = fetch_archive()  # the preprocessed census splits are cached next to it: the next demo starts sooner
    assert cached_splits_path(archive.parent, archive, ("income", "marital"), 0).is_file()
    print(f"quick demo: {seconds:.1f} s")  # about 25 s on a 2-core machine with both cores busy elsewhere


@pytest.mark.slow
def test_the_overview_of_a_finished_polarized_run_offers_the_remedy_test(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The button starts the gate-dropout sweep on the saved model (the launch is recorded, not run, here)."""
    import shutil

    from test_app import open_app

    from gatewatch.app import ablations

    for name in ("mmoe-polarized", "census-mmoe"):
        shutil.copytree(SAMPLE_RUNS / name, tmp_path / name, ignore=shutil.ignore_patterns("ablations"))
    launched: list[tuple] = []
    monkeypatch.setattr(ablations, "launch", lambda path, kind, options: launched.append((path, kind, options)))
    healthy = open_app(tmp_path, monkeypatch, "overview", run="census-mmoe")
    assert not [b for b in healthy.button if b.label.startswith("Run the gate-dropout sweep")]  # nothing to remedy
    at = open_app(tmp_path, monkeypatch, "overview", run="mmoe-polarized")
    (button,) = [b for b in at.button if b.label == "Run the gate-dropout sweep on this run"]
    button.click().run()
    assert not at.exception
    ((path, kind, options),) = launched
    assert path == tmp_path / "mmoe-polarized" and kind == "dropout_sweep" and 0.0 in options.rates
    assert any("running on the saved model" in s.value for s in at.success)
