"""Each remedy does what it says, checked against numpy / hand computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from gatewatch.models import MMoE
from gatewatch.remedies import (
    GateDropout,
    GateFreezer,
    TemperatureSoftmax,
    UncertaintyWeighting,
    init_gate_,
    make_gate,
)


def np_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def random_probs(n: int, e: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, e, generator=g), dim=-1)


# ---------------------------------------------------------------- GateDropout


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, True, "0.1", float("nan")])
def test_gate_dropout_rejects_bad_p(p):
    with pytest.raises(ValueError, match="0 <= p < 1"):
        GateDropout(p)


def test_gate_dropout_identity_in_eval_and_at_zero():
    probs = random_probs(64, 4)
    drop = GateDropout(0.5).eval()
    assert drop(probs) is probs
    assert GateDropout(0.0).train()(probs) is probs


def test_gate_dropout_rows_sum_to_one_and_never_all_zero():
    torch.manual_seed(0)
    probs = random_probs(20_000, 2)
    out = GateDropout(0.9).train()(probs)
    np.testing.assert_allclose(out.sum(-1).numpy(), 1.0, atol=1e-6)
    assert bool((out > 0).any(-1).all())
    assert not torch.isnan(out).any()


def test_gate_dropout_is_mask_and_renormalise():
    torch.manual_seed(1)
    probs = random_probs(5_000, 6)
    out = GateDropout(0.3).train()(probs)
    kept = probs * (out > 0)
    expected = kept / kept.sum(-1, keepdim=True)
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-5, atol=1e-7)


def test_gate_dropout_observed_drop_rate_matches_p():
    torch.manual_seed(2)
    n, e, p = 50_000, 4, 0.3
    probs = torch.full((n, e), 1.0 / e)
    out = GateDropout(p).train()(probs)
    # all-masked rows (probability p**e) keep their argmax: expected zeros per row = e p - p**e
    rate = (e * p - p**e) / e
    std = math.sqrt(rate * (1 - rate) / (n * e))
    observed = (out == 0).float().mean().item()
    assert abs(observed - rate) < 5 * std


def test_gate_dropout_all_masked_rows_keep_their_argmax():
    torch.manual_seed(3)
    probs = torch.tensor([[0.2, 0.5, 0.3]]).repeat(10_000, 1)
    out = GateDropout(0.99).train()(probs)
    one_hot_at_argmax = (out[:, 1] == 1.0).float().mean().item()
    # all masked (0.99^3) or only the argmax kept (0.01 * 0.99^2): 0.9801; other one-hots ~2%
    assert one_hot_at_argmax > 0.95


def test_gate_dropout_row_without_kept_mass_falls_back_to_argmax():
    torch.manual_seed(4)
    probs = torch.tensor([[0.0, 1.0, 0.0]]).repeat(1_000, 1)
    out = GateDropout(0.5).train()(probs)
    assert torch.equal(out, probs)


def test_gate_dropout_keeps_leading_dims_and_gradients():
    torch.manual_seed(5)
    logits = torch.randn(3, 7, 5, requires_grad=True)
    out = GateDropout(0.2).train()(torch.softmax(logits, -1))
    assert out.shape == (3, 7, 5)
    np.testing.assert_allclose(out.sum(-1).detach().numpy(), 1.0, atol=1e-6)
    (out * torch.arange(5.0)).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# ---------------------------------------------------------------- TemperatureSoftmax


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0, 3.0])
def test_temperature_softmax_equals_numpy(temperature):
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    module = TemperatureSoftmax(temperature=temperature)
    assert isinstance(module, nn.Softmax)
    np.testing.assert_allclose(module(x).numpy(), np_softmax(x.numpy() / temperature), rtol=1e-5, atol=1e-7)


def test_temperature_softmax_other_dim():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    out = TemperatureSoftmax(dim=0, temperature=2.0)(x)
    np.testing.assert_allclose(out.numpy(), np_softmax(x.numpy() / 2.0, axis=0), rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_temperature_softmax_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        TemperatureSoftmax(temperature=temperature)


# ---------------------------------------------------------------- init / make_gate


def test_init_gate_sets_small_normal_weights_and_zero_bias():
    torch.manual_seed(0)
    linear = nn.Linear(400, 50)
    assert init_gate_(linear, std=1e-3) is linear
    weights = linear.weight.detach().numpy()
    assert abs(weights.mean()) < 5e-5
    assert weights.std() == pytest.approx(1e-3, rel=0.03)
    assert np.all(linear.bias.detach().numpy() == 0)
    with pytest.raises(ValueError):
        init_gate_(linear, std=-1.0)


def test_make_gate_plain_is_linear_then_softmax():
    gate = make_gate(6, 4)
    assert [type(m) for m in gate] == [nn.Linear, nn.Softmax]
    x = torch.randn(10, 6)
    linear = gate[0]
    expected = np_softmax(x.numpy() @ linear.weight.detach().numpy().T + linear.bias.detach().numpy())
    np.testing.assert_allclose(gate(x).detach().numpy(), expected, rtol=1e-5, atol=1e-7)


def test_make_gate_with_every_option():
    torch.manual_seed(0)
    gate = make_gate(300, 4, temperature=0.5, layernorm=True, dropout=0.1, init_std=1e-2)
    assert [type(m) for m in gate] == [nn.Linear, nn.LayerNorm, TemperatureSoftmax, GateDropout]
    assert gate[2].temperature == 0.5 and gate[3].p == 0.1
    assert gate[0].weight.detach().std().item() == pytest.approx(1e-2, rel=0.05)
    gate.eval()
    x = torch.randn(8, 300)
    z = x.numpy() @ gate[0].weight.detach().numpy().T + gate[0].bias.detach().numpy()
    normed = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(gate(x).detach().numpy(), np_softmax(normed / 0.5), rtol=1e-4, atol=1e-6)


def test_make_gate_validates_dropout():
    with pytest.raises(ValueError):
        make_gate(3, 2, dropout=-0.1)


# ---------------------------------------------------------------- GateFreezer


def _train_steps(model, freezer, optimizer, steps):
    """Run ``steps`` steps; return the gate and expert parameters after each one."""
    gen = torch.Generator().manual_seed(0)
    history = []
    for step in range(steps):
        x = torch.randn(32, 5, generator=gen)
        loss = sum(out.pow(2).mean() for out in model(x)) + sum(
            (1 - out).pow(2).mean() for out in model(x + 1)
        )
        optimizer.zero_grad()
        loss.backward()
        freezer.step(step)
        optimizer.step()
        gates = torch.cat([p.detach().flatten() for p in model.gates.parameters()]).clone()
        experts = torch.cat([p.detach().flatten() for p in model.experts.parameters()]).clone()
        history.append((gates, experts, freezer.frozen))
    return history


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.Adam])
def test_gate_freezer_stops_gate_updates_from_at_step(optimizer_cls):
    torch.manual_seed(0)
    model = MMoE(in_dim=5, tasks=["a", "b"], n_experts=3, expert_hidden=[8], expert_dim=4, tower_hidden=[4])
    freezer = GateFreezer(model.gates, at_step=3)
    kwargs = {"lr": 0.05, "momentum": 0.9} if optimizer_cls is torch.optim.SGD else {"lr": 0.05}
    history = _train_steps(model, freezer, optimizer_cls(model.parameters(), **kwargs), steps=6)
    assert [frozen for _, _, frozen in history] == [False, False, False, True, True, True]
    for step, (before, after) in enumerate(itertools.pairwise(history), start=1):
        assert torch.equal(before[0], after[0]) == (step >= 3)
        assert not torch.equal(before[1], after[1])
    assert all(not p.requires_grad for p in model.gates.parameters())
    assert all(p.requires_grad for p in model.experts.parameters())


def test_gate_freezer_accepts_parameters_and_validates():
    linear = nn.Linear(2, 2)
    freezer = GateFreezer([linear.weight], at_step=0)
    assert not freezer.frozen
    assert freezer.step(0) and not linear.weight.requires_grad and linear.bias.requires_grad
    with pytest.raises(ValueError):
        GateFreezer(linear, at_step=-1)
    with pytest.raises(ValueError):
        GateFreezer([], at_step=1)
    with pytest.raises(TypeError):
        GateFreezer(["weight"], at_step=1)


# ---------------------------------------------------------------- UncertaintyWeighting


def test_uncertainty_weighting_matches_hand_formula_and_gradient():
    uw = UncertaintyWeighting(["a", "b"])
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.3, -0.2]))
    la = torch.tensor(2.0, requires_grad=True)
    lb = torch.tensor(0.5, requires_grad=True)
    total = uw({"b": lb, "a": la})
    s = np.array([0.3, -0.2])
    losses = np.array([2.0, 0.5])
    assert total.item() == pytest.approx(float(np.sum(np.exp(-s) * losses + s)), rel=1e-6)
    total.backward()
    np.testing.assert_allclose(uw.log_vars.grad.numpy(), -np.exp(-s) * losses + 1, rtol=1e-6)
    assert la.grad.item() == pytest.approx(math.exp(-0.3), rel=1e-6)
    assert lb.grad.item() == pytest.approx(math.exp(0.2), rel=1e-6)
    weights = uw.weights()
    assert list(weights) == ["a", "b"]
    assert weights["a"] == pytest.approx(math.exp(-0.3), rel=1e-6)


def test_uncertainty_weighting_validates():
    with pytest.raises(ValueError):
        UncertaintyWeighting(["a", "a"])
    with pytest.raises(KeyError):
        UncertaintyWeighting(["a", "b"])({"a": torch.tensor(1.0)})
    assert UncertaintyWeighting(["a"]).weights() == {"a": 1.0}
