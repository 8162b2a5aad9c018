"""The opt-in online guard: gate dropout when polarization or collapse is found at a flush, recorded, reverted;
training untouched when it is off or nothing fires."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import batch, task_losses, tiny_mmoe

import gatewatch as gw
from gatewatch.report import build_report


def run_steps(model, watch, steps: int, start: int = 0) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(start, start + steps):
        x, y = batch(step, 32, 12)
        losses = task_losses(model(x), y, model.tasks)
        if watch is None:
            sum(losses.values()).backward()
        else:
            watch.backward(losses)
        opt.step()
        opt.zero_grad()
        if watch is not None:
            watch.step()


def seen_downstream(model, task: str, x: torch.Tensor) -> torch.Tensor:
    """The gate output as the model uses it (after every hook on the softmax)."""
    out = {}
    handle = model.gates[task][2].register_forward_hook(lambda _m, _i, o: out.__setitem__("p", o.detach()))
    model(x)
    handle.remove()
    return out["p"]


def unhooked(model, task: str, x: torch.Tensor) -> torch.Tensor:
    """The gate's own output, bypassing every hook."""
    linear, shift, softmax = model.gates[task]
    return softmax.forward(shift(linear(x))).detach()


def test_guard_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="some of"):
        gw.Guard(rules=("dead_expert",))
    with pytest.raises(ValueError, match="dropout"):
        gw.Guard(dropout=1.5)
    with pytest.raises(ValueError, match="revert_after"):
        gw.Guard(revert_after=0)
    assert gw.Guard(rules="collapse").rules == ("collapse",)


@pytest.mark.slow
def test_polarized_gate_gets_dropout_then_revert(tmp_path: Path) -> None:
    model = tiny_mmoe()
    model.force_gate("ctr", [12.0, 0.0, 0.0, 0.0])  # ctr's gate puts ~all weight on expert 0
    guard = gw.Guard(rules=("polarization",), dropout=0.5, revert_after=2)
    watch = gw.GateWatch(model, tasks=["ctr", "like"], log_dir=tmp_path / "run", tensorboard=False, every=2,
                         flush_every=2, guard=guard)
    x = torch.randn(256, 12)
    run_steps(model, watch, 2)
    assert watch.guard.active == ["ctr"]  # polarization fired at the first flush, on the ctr gate only
    masked = seen_downstream(model, "ctr", x)
    assert (masked[:, 0] < 0.5).float().mean() > 0.2  # expert 0 dropped for about half the samples
    model.eval()
    assert torch.equal(seen_downstream(model, "ctr", x), unhooked(model, "ctr", x))  # eval untouched
    model.train()
    run_steps(model, watch, 4, start=2)
    assert watch.guard.active == []  # removed after 2 windows
    watch.close()
    run = gw.load_run(tmp_path / "run")
    events = build_report(run)["guard"]
    assert [(e["step"], e["gate"], e["action"]) for e in events] == [(2, "ctr", "dropout"), (6, "ctr", "revert")]
    assert events[0]["rule"] == "polarization" and events[0]["before"]["top_share"] > 0.9
    assert events[0]["after"]["step"] == 4 and events[0]["rate"] == 0.5
    logged = run.table("events")
    assert list(logged.loc[logged["kind"] == "guard", "step"]) == [2, 6]


@pytest.mark.slow
def test_revert_by_hand(tmp_path: Path) -> None:
    model = tiny_mmoe()
    model.force_gate("ctr", [12.0, 0.0, 0.0, 0.0])
    with gw.GateWatch(model, tasks=["ctr", "like"], log_dir=tmp_path / "run", tensorboard=False, every=2,
                      flush_every=2, guard=gw.Guard()) as watch:
        run_steps(model, watch, 2)
        assert "ctr" in watch.guard.active
        watch.guard.revert()
        assert watch.guard.active == []
        x = torch.randn(64, 12)
        assert torch.equal(seen_downstream(model, "ctr", x), unhooked(model, "ctr", x))
    actions = [e["action"] for e in build_report(gw.load_run(tmp_path / "run"))["guard"]]
    assert actions[-1] == "revert"


@pytest.mark.parametrize("guard", [None, gw.Guard()], ids=["off", "on-but-quiet"])
@pytest.mark.slow
def test_training_unchanged_without_a_firing_guard(tmp_path: Path, guard) -> None:
    model = tiny_mmoe()
    twin = copy.deepcopy(model)
    with gw.GateWatch(model, tasks=["ctr", "like"], log_dir=tmp_path / "run", tensorboard=False, every=2,
                      flush_every=2, guard=guard) as watch:
        run_steps(model, watch, 6)
        assert watch.guard is None or watch.guard.active == []
    run_steps(twin, None, 6)
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert torch.equal(a, b), name
