"""Routing stability and saturation against a brute-force re-run of the probe, and a probe that leaves the training
statistics alone."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from _hf_moe import batch, build

import gatewatch as gw
from gatewatch.gating.discovery import resolve
from gatewatch.quantities.routing_stability.reference import saturation_against
from gatewatch.report import build_report, render_text
from gatewatch.run_reader import load_run

pytest.importorskip("transformers")

STEPS, EVERY, PROBE_EVERY = 6, 2, 2


def brute_sets(model: torch.nn.Module, probe: dict[str, torch.Tensor], k: int) -> dict[str, tuple[list, list]]:
    """Each router's top-k sets and top-1 on ``probe``, from a plain eval-mode forward of a copy of the model."""
    model = copy.deepcopy(model).eval()
    out: dict[str, tuple[list, list]] = {}
    for g in resolve(model, None, None):
        def grab(_m: Any, _i: Any, o: Any, name: str = g.name) -> None:
            idx, w = o[2].reshape(-1, k), o[1].reshape(-1, k)
            out[name] = ([tuple(sorted(int(x) for x in row)) for row in idx],
                         [int(row[j]) for row, j in zip(idx, w.argmax(-1), strict=True)])
        g.module.register_forward_hook(grab)
    with torch.no_grad():
        model(**probe)
    return out


def train(family: str, log_dir: Path, *, probe: bool, given: dict[str, torch.Tensor] | None = None,
          steps: int = STEPS) -> tuple[dict[int, dict[str, tuple[list, list]]], gw.GateWatch]:
    model = build(family).train()
    options = {"saturation_every": PROBE_EVERY, "saturation_probe": given} if probe else {}
    watch = gw.GateWatch(model, log_dir=log_dir, every=EVERY, tensorboard=False, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    first = batch(family, seed=1)
    expected: dict[int, dict[str, tuple[list, list]]] = {}
    for step in range(1, steps + 1):
        model(**batch(family, seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        if step % PROBE_EVERY == 0 or step == steps:  # close() probes the final model when the last step was not
            expected[step] = brute_sets(model, given or first, 2)
        watch.step()
    watch.close()
    return expected, watch


def share_same(a: list, b: list) -> float:
    return float(np.mean([x == y for x, y in zip(a, b, strict=True)]))


@pytest.mark.parametrize(("family", "steps"), [("qwen3_moe", 6), ("deepseek_v3", 7)])
def test_stability_and_saturation_equal_a_brute_force_rerun_of_the_probe(tmp_path: Path, family: str,
                                                                         steps: int) -> None:
    expected, _ = train(family, tmp_path / "run", probe=True, steps=steps)
    run = load_run(tmp_path / "run")
    sets, stable, saturation = run.table("routing_sets"), run.table("routing_stability"), run.table("saturation")
    steps = sorted(expected)
    assert sorted(stable["step"].unique()) == steps
    final = expected[steps[-1]]
    for gate in final:
        for i, step in enumerate(steps):
            mine = sets[(sets["gate"] == gate) & (sets["step"] == step)].sort_values("token")
            want_sets, want_top1 = expected[step][gate]
            assert [tuple(int(x) for x in s.split()) for s in mine["experts"]] == want_sets
            assert mine["top1"].tolist() == want_top1
            row = stable[(stable["gate"] == gate) & (stable["step"] == step)].iloc[0]
            if i == 0:
                assert np.isnan(row["stable"]) and np.isnan(row["top1_agree"])
            else:
                before = expected[steps[i - 1]][gate]
                assert row["stable"] == pytest.approx(share_same(want_sets, before[0]))
                assert row["top1_agree"] == pytest.approx(share_same(want_top1, before[1]))
            sat = saturation[(saturation["gate"] == gate) & (saturation["step"] == step)].iloc[0]
            assert sat["reference"] == "final"
            assert sat["saturation"] == pytest.approx(share_same(want_sets, final[gate][0]))
            assert sat["top1_agree"] == pytest.approx(share_same(want_top1, final[gate][1]))
    assert stable["stable"].dropna().lt(1).any(), "the test needs routing that changes between probes"
    report = build_report(run)
    assert report["routing_stability"]["saturation"][-1]["value"] == pytest.approx(1.0)
    assert "routing stability (probe at step" in render_text(report)


def test_the_probe_leaves_the_training_statistics_alone(tmp_path: Path) -> None:
    train("qwen3_moe", tmp_path / "plain", probe=False)
    train("qwen3_moe", tmp_path / "probed", probe=True)
    plain, probed = load_run(tmp_path / "plain"), load_run(tmp_path / "probed")
    for table in ("gates", "shares", "routers", "router_experts", "coactivation_top"):
        pd.testing.assert_frame_equal(plain.table(table), probed.table(table))
    assert not len(plain.table("routing_sets")) and len(probed.table("routing_sets"))


def test_saturation_against_a_reference_checkpoint(tmp_path: Path) -> None:
    probe = batch("qwen3_moe", seed=7)
    _, watch = train("qwen3_moe", tmp_path / "run", probe=True, given=probe)
    assert watch.routing_stability.probe_batch == ((), probe)
    run = load_run(tmp_path / "run")
    reference = build("qwen3_moe", seed=3)  # another checkpoint
    want = brute_sets(reference, probe, 2)
    got = saturation_against(run, reference, probe, name="seed 3")
    sets = run.table("routing_sets")
    assert len(got) == sets.groupby(["gate", "step"]).ngroups and set(got["reference"]) == {"seed 3"}
    for row in got.itertuples(index=False):
        mine = sets[(sets["gate"] == row.gate) & (sets["step"] == row.step)].sort_values("token")
        ours = [tuple(int(x) for x in s.split()) for s in mine["experts"]]
        assert row.saturation == pytest.approx(share_same(ours, want[row.gate][0]))
        assert row.top1_agree == pytest.approx(share_same(mine["top1"].tolist(), want[row.gate][1]))


def test_bad_settings_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs sparse routers"):
        gw.GateWatch(gw.models.MMoE(tasks=["a", "b"], in_dim=4, n_experts=2), tasks=["a", "b"],
                     log_dir=tmp_path / "a", saturation_every=5, tensorboard=False)
    with pytest.raises(TypeError, match="saturation_probe takes"):
        gw.GateWatch(build("qwen3_moe"), log_dir=tmp_path / "b", saturation_every=5, saturation_probe="x",
                     tensorboard=False)
