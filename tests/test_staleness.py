"""Stale-gradient training against a hand-written stale loop (deep copies of the model, one per step)."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch

import gatewatch as gw
from gatewatch.training import TrainConfig, load_dataset, load_model, train
from gatewatch.training.loop import OPTIMIZERS, batches, build_model, seed_everything, task_losses
from gatewatch.training.staleness import Staleness

TINY_MODEL = {"n_experts": 3, "expert_hidden": [8], "expert_dim": 4, "tower_hidden": [4]}
TINY_DATA = {"n_train": 256, "n_val": 64, "n_test": 64, "dim": 6, "n_sin": 2}
STEPS = 12


def config(**overrides) -> TrainConfig:
    base = {"model_kwargs": dict(TINY_MODEL), "data_kwargs": dict(TINY_DATA), "steps": STEPS, "batch_size": 32,
            "lr": 1e-2, "every": 2, "flush_every": 4, "tensorboard": False, "seed": 3}
    return TrainConfig(**{**base, **overrides})


def trained(tmp: Path, **overrides) -> dict[str, torch.Tensor]:
    train(config(**overrides), tmp, progress=False)
    return load_model(tmp)[0].state_dict()


def reference(cfg: TrainConfig, delays: list[int]) -> dict[str, torch.Tensor]:
    """Plain stale loop: step t's gradient comes from a copy of the model as it was after step t - delays[t]."""
    splits = load_dataset(cfg.data, **cfg.data_kwargs)
    seed_everything(cfg.seed)
    model = build_model(splits, cfg)
    optimizer = OPTIMIZERS[cfg.optimizer](model.parameters(), lr=cfg.lr)
    rows = batches(len(splits.x_train), cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    history = [copy.deepcopy(model)]  # history[s]: the model before step s (s = 0: the initial one)
    for t in range(cfg.steps):
        index = next(rows)
        old = history[max(0, t - delays[t])]
        losses = task_losses(old(splits.x_train[index]), splits.y_train[index], splits.tasks, splits.task_types)
        old.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        for p, q in zip(model.parameters(), old.parameters(), strict=True):
            p.grad = q.grad.clone()
        old.zero_grad(set_to_none=True)
        optimizer.step()
        history.append(copy.deepcopy(model))
    return model.state_dict()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("delay", ["fixed", "random"])
def test_tau_0_is_bitwise_the_normal_loop(tmp_path, delay):
    assert_same(trained(tmp_path / "plain"), trained(tmp_path / "stale", staleness=0, staleness_delay=delay))
    assert_same(trained(tmp_path / "plain2"), reference(config(), [0] * STEPS))


@pytest.mark.slow
@pytest.mark.parametrize("watch", [True, False])
def test_tau_2_equals_the_hand_written_stale_loop(tmp_path, watch):
    stale = trained(tmp_path / "stale", staleness=2, watch=watch)
    assert_same(stale, reference(config(), [2] * STEPS))
    fresh = trained(tmp_path / "fresh", watch=watch)
    assert not all(torch.equal(stale[k], fresh[k]) for k in stale)  # the delay changes the result


@pytest.mark.slow
def test_random_delays_follow_their_seed_and_match_the_reference(tmp_path):
    tau, seed = 3, 5
    rng = random.Random(seed)
    delays = [rng.randint(0, tau) for _ in range(STEPS)]
    assert len(set(delays)) > 1
    a = trained(tmp_path / "a", staleness=tau, staleness_delay="random", seed=seed)
    assert_same(a, trained(tmp_path / "b", staleness=tau, staleness_delay="random", seed=seed))
    assert_same(a, reference(config(seed=seed), delays))
    other = trained(tmp_path / "c", staleness=tau, staleness_delay="random", seed=seed + 1)
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_delays_are_clamped_at_the_start_and_cover_0_to_tau():
    model = torch.nn.Linear(2, 1)
    fixed = Staleness(model, 4)
    for _ in range(7):
        with fixed.stale():
            pass
    assert fixed.delays == [0, 1, 2, 3, 4, 4, 4] and len(fixed.snapshots) == 5
    rand = Staleness(model, 4, "random", seed=1)
    for _ in range(300):
        with rand.stale():
            pass
    assert set(rand.delays[10:]) == {0, 1, 2, 3, 4}


def test_the_block_sees_old_parameters_and_leaves_the_current_ones_with_its_gradient():
    model = torch.nn.Linear(1, 1, bias=False)
    stale = Staleness(model, 1)
    seen = []
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            model.weight.fill_(value)
        with stale.stale():
            seen.append(float(model.weight.detach()))
            model.weight.grad = None
            (model.weight * 10).sum().backward()
        assert float(model.weight.detach()) == value and float(model.weight.grad) == 10.0
    assert seen == [1.0, 1.0, 2.0]


def test_a_stale_run_is_a_readable_gatewatch_run(tmp_path):
    train(config(staleness=3, staleness_delay="random"), tmp_path, progress=False)
    run = gw.load_run(tmp_path)
    assert run.status == "finished" and run.steps == STEPS and set(run.gates["gate"]) == {"t1", "t2"}
    assert run.meta["user_config"]["staleness"] == 3


@pytest.mark.parametrize(("overrides", "message"), [
    ({"staleness": -1}, "non-negative integer"),
    ({"staleness": 2.0}, "pass it as an int: 2"),
    ({"staleness_delay": "poisson"}, "unknown staleness_delay"),
])
def test_staleness_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides)
