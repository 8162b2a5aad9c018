"""Findings on runs recorded from gates forced into each failure mode (and a healthy one)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import TinyMMoE, batch, tiny_mmoe

import gatewatch as gw

TASKS = ["ctr", "like"]


def record(tmp_path, model: TinyMMoE, steps: int = 20, every: int = 2,
           before_step: Callable[[int, TinyMMoE], None] | None = None, nan_at: int | None = None) -> gw.Run:
    """Forward passes only (the gates are forced, nothing needs to learn), logged every ``every`` steps."""
    with gw.GateWatch(model, tasks=TASKS, log_dir=tmp_path, every=every, tensorboard=False) as watch, \
            torch.no_grad():
        for step in range(1, steps + 1):
            if before_step is not None:
                before_step(step, model)
            x = batch(step, n=128)[0]
            if step == nan_at:
                x[0] = float("nan")
            model(x)
            watch.step()
    return gw.load_run(tmp_path)


def codes(findings: list[gw.Finding]) -> list[tuple[str, str | None, str | None]]:
    return sorted((f.code, f.gate, f.expert) for f in findings)


def sharp_but_spread(model: TinyMMoE, task: str) -> None:
    """Logits 30 * x[:, :E]: every sample is routed sharply, to the expert of its largest feature."""
    linear = model.gates[task][0]
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight[:, : linear.out_features] = 30 * torch.eye(linear.out_features)


def test_healthy_gates_have_no_findings(tmp_path) -> None:
    run = record(tmp_path, tiny_mmoe())
    assert gw.find(run) == []


def test_polarized_gate_is_an_error_from_the_step_it_began(tmp_path) -> None:
    def polarize_late(step: int, model: TinyMMoE) -> None:
        if step == 9:  # windows end at 2, 4, ...: the window ending at step 10 is the first polarized one
            model.force_gate("like", [12.0, 0.0, 0.0, 0.0])

    run = record(tmp_path, tiny_mmoe(), before_step=polarize_late)
    found = gw.find(run)
    assert codes(found) == [("polarization", "like", None)]
    f = found[0]
    assert (f.severity, f.task, f.step, f.chart) == ("error", "like", 10, "gates")
    assert "100% of the weight on expert 0" in f.message and "GateDropout" in f.remedy


def test_sharp_but_spread_routing_is_info_not_polarization(tmp_path) -> None:
    model = tiny_mmoe()
    sharp_but_spread(model, "ctr")
    run = record(tmp_path, model)
    last = run.gates[run.gates["gate"] == "ctr"].iloc[-1]
    assert last["polarization"] > 0.8 and last["top_share"] < 0.5 and last["mutual_info"] > 0.7
    found = gw.find(run)
    assert codes(found) == [("sharp_routing", "ctr", None)]
    assert found[0].severity == "info" and found[0].step == 2


def test_dead_expert_is_reported_with_its_name(tmp_path) -> None:
    model = tiny_mmoe()
    for task in TASKS:
        model.force_gate(task, [0.0, 0.0, 0.0, -30.0], freeze=False)
    found = gw.find(record(tmp_path, model))
    assert codes(found) == [("dead_expert", None, "3")]
    assert found[0].severity == "warning" and found[0].chart == "experts"


def test_collapse_onto_one_expert_across_tasks(tmp_path) -> None:
    model = tiny_mmoe(n_experts=8)
    for task in TASKS:
        model.force_gate(task, [10.0] + [0.0] * 7)
    found = gw.find(record(tmp_path, model))
    assert ("collapse", None, None) in codes(found)
    collapse = next(f for f in found if f.code == "collapse")
    assert collapse.severity == "error" and "1 of 8 experts (0)" in collapse.message
    assert {f.gate for f in found if f.code == "polarization"} == set(TASKS)
    assert {f.expert for f in found if f.code == "dead_expert"} == {str(i) for i in range(1, 8)}
    assert [f.severity for f in found][:3] == ["error"] * 3  # most severe first


def test_constant_bias_gate_is_input_independent(tmp_path) -> None:
    model = tiny_mmoe()
    model.force_gate("ctr", [1.0, 0.5, 0.0, -0.5])
    found = gw.find(record(tmp_path, model))
    assert codes(found) == [("input_independent", "ctr", None)]
    assert found[0].severity == "warning" and found[0].step == 2


def test_swinging_gate_is_unstable(tmp_path) -> None:
    def swing(step: int, model: TinyMMoE) -> None:
        if step % 2 == 1:  # a new mixture for every 2-step window
            model.force_gate("ctr", [2.0, 0, 0, 0] if step % 4 == 1 else [0, 0, 0, 2.0], freeze=False)

    run = record(tmp_path, tiny_mmoe(), steps=24, before_step=swing)
    found = [f for f in gw.find(run) if f.code == "unstable"]
    assert [(f.gate, f.severity, f.step) for f in found] == [("ctr", "warning", 14)]


@pytest.mark.filterwarnings("ignore:gatewatch.*NaN/Inf:RuntimeWarning")
def test_nonfinite_gate_is_an_error_at_its_first_step(tmp_path) -> None:
    found = gw.find(record(tmp_path, tiny_mmoe(), nan_at=7))
    assert codes(found) == [("nonfinite", "ctr", None), ("nonfinite", "like", None)]
    assert {(f.severity, f.step) for f in found} == {("error", 7)}


def test_thresholds_move_the_line(tmp_path) -> None:
    model = tiny_mmoe()
    model.force_gate("like", [3.5, 0.0, 0.0, 0.0])  # mean top share about 0.91
    run = record(tmp_path, model)
    assert codes(gw.find(run)) == [("polarization", "like", None)]
    lenient = gw.Thresholds.from_dict({"collapse_share": 0.95})
    assert ("polarization", "like", None) not in codes(gw.find(run, lenient))
    with pytest.raises(ValueError, match="Unknown thresholds \\['nope'\\]"):
        gw.Thresholds.from_dict({"nope": 1})


def test_empty_run_has_no_findings(tmp_path) -> None:
    gw.GateWatch(tiny_mmoe(), tasks=TASKS, log_dir=tmp_path, tensorboard=False).close()
    assert gw.find(gw.load_run(tmp_path)) == []
