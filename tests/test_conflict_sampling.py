"""Sign statistics of large shared tensors are counted on a fixed sample of 4,096 elements each: cosines and
norms stay exact, tensors under the sampling size stay exact, and the sampled shares and purity histograms stay
within a 4-standard-error bound of the exact counts (plain numpy on the full gradients)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_conflict import data_losses, pair_reference, run_with_reference

import gatewatch as gw
from gatewatch.models import MMoE
from gatewatch.quantities.conflict.maths import (
    PURITY_BINS,
    SAMPLE_FROM,
    SAMPLE_SIZE,
    SignSample,
    sampled_size,
    stack_rows,
    task_pairs,
    task_statistics,
)


def bound(m: int) -> float:
    """Four standard errors of a share estimated from ``m`` sampled elements (worst case p = 0.5)."""
    return 4 * 0.5 / np.sqrt(m)


def purity_share(g: np.ndarray) -> np.ndarray:
    """The share of elements per purity bin (elements no task touches left out), in numpy."""
    total, magnitude = g.sum(0), np.abs(g).sum(0)
    defined = magnitude > 0
    purity = 0.5 * (1 + total[defined] / magnitude[defined])
    counts = np.histogram(purity, bins=PURITY_BINS, range=(0.0, 1.0))[0]
    return counts / max(counts.sum(), 1)


def correlated(k: int, sizes: list[int], seed: int = 0) -> torch.Tensor:
    """``[K, M]`` task gradients that agree in part (cosines around 0.3) with exact zeros in places."""
    rng = np.random.default_rng(seed)
    m = sum(sizes)
    common = rng.normal(size=m)
    g = np.stack([0.6 * common + rng.normal(size=m) for _ in range(k)])
    g[:, rng.random(m) < 0.05] = 0.0
    return torch.from_numpy(g).float()


@pytest.mark.parametrize("k", [2, 4])
def test_sampled_sign_statistics_are_within_four_standard_errors_and_grams_stay_exact(k):
    sizes = [40_000, 300, 20_000, 16_383]  # two sampled units, two counted whole
    units, at = [], 0
    for n in sizes:
        units.append((at, at + n))
        at += n
    groups = [(units[0][0], units[1][1]), (units[2][0], units[3][1])]
    g = correlated(k, sizes)
    stack = torch.empty(stack_rows(k), at)
    stack[:k] = g
    sample = SignSample.plan(units, groups, k, stack)
    assert sample is not None and sample.positions().numel() == sum(sampled_size(n) for n in sizes)
    assert [sampled_size(n) for n in sizes] == [SAMPLE_SIZE, 300, SAMPLE_SIZE, 16_383]
    assert len(sample.pieces) == 1  # the short units counted whole join the sampled positions: one gather
    index = sample.positions().numpy()
    gathered = torch.empty(k, len(index))
    sample.gather(g, gathered)
    assert torch.equal(gathered, g[:, index]), "the pieces gather exactly the sampled positions"
    for (s, e), (a, b) in zip(units, sample.units, strict=True):  # distinct, sorted positions inside each unit
        assert np.all(np.diff(index[a:b]) > 0) and s <= index[a] and index[b - 1] < e
    flat = task_statistics(stack, k, units, groups, PURITY_BINS, sample).double().numpy()
    pairs = task_pairs(k)
    n_units = len(units)
    grams = flat[: n_units * k * k].reshape(n_units, k, k)
    cut = n_units * k * k
    disagree = flat[cut : cut + n_units * len(pairs)].reshape(n_units, len(pairs))
    counts = flat[cut + n_units * len(pairs) :].reshape(len(groups), PURITY_BINS + 1)
    full = g.double().numpy()
    assert torch.equal(stack[:k], g), "sampling leaves the task gradients as they were"
    for u, (s, e) in enumerate(units):
        np.testing.assert_allclose(grams[u], full[:, s:e] @ full[:, s:e].T, rtol=1e-4)
        m = sampled_size(e - s)
        for i, (a, b) in enumerate(pairs):
            exact = pair_reference(full[a, s:e], full[b, s:e])["sign_conflict"]
            share = disagree[u, i] / m
            if m == e - s:
                assert share == pytest.approx(exact, abs=1e-12), "a unit under the sampling size is counted whole"
            else:
                assert abs(share - exact) <= bound(m), (u, share, exact)
                positions = index[sample.units[u][0] : sample.units[u][1]]
                assert disagree[u, i] == int((full[a, positions] * full[b, positions] < 0).sum())
    for j, (s, e) in enumerate(groups):
        got = counts[j, :PURITY_BINS] / max(counts[j, :PURITY_BINS].sum(), 1)
        m = int(sum(sampled_size(ue - us) for us, ue in units if s <= us and ue <= e))
        assert np.abs(got - purity_share(full[:, s:e])).max() <= bound(m)


def test_no_sample_when_every_unit_is_small():
    units = [(0, SAMPLE_FROM - 1), (SAMPLE_FROM - 1, SAMPLE_FROM + 99)]
    assert SignSample.plan(units, units, 2, torch.empty(4, SAMPLE_FROM + 99)) is None


def test_logged_sign_conflict_of_a_large_expert_is_within_the_bound_and_cosines_stay_exact(tmp_path):
    torch.manual_seed(0)
    model = MMoE(in_dim=128, tasks=["a", "b"], n_experts=2, expert_hidden=[256], expert_dim=64, tower_hidden=[8])
    run, measured, _ = run_with_reference(model, tmp_path, steps=3, losses=data_losses(n=64))
    conflict = run.table("conflict")
    assert run.meta["conflict"]["sign_sample"] == {"from_elements": SAMPLE_FROM, "elements": SAMPLE_SIZE, "seed": 0}
    names = dict(model.named_parameters())
    checked = 0
    for step, grads in measured:
        rows = conflict[(conflict["step"] == step) & (conflict["scope"] == "param")].set_index("name")
        for name in rows.index:
            ref = pair_reference(grads["a"][name], grads["b"][name])
            row = rows.loc[name]
            assert row["elements"] == names[name].numel()
            assert row["cosine"] == pytest.approx(ref["cosine"], abs=2e-5)
            assert row["norm_a"] == pytest.approx(ref["norm_a"], rel=2e-5)
            m = sampled_size(names[name].numel())
            if m == names[name].numel():
                assert row["sign_conflict"] * m == pytest.approx(ref["sign_conflict"] * m, abs=1e-6)
            else:
                assert abs(row["sign_conflict"] - ref["sign_conflict"]) <= bound(m)
                checked += 1
    assert checked >= 3, "the 128 x 256 expert weights are sampled and were checked"
    purity = run.table("purity")
    total = purity[(purity["scope"] == "all")].groupby("step")["count"].sum()
    elements = sum(p.numel() for n, p in names.items() if n.startswith("experts."))
    assert ((total > 0.9 * elements) & (total <= elements * 1.001)).all(), "purity counts are scaled to elements"


def test_micro_batches_after_a_single_batch_step_give_the_figures_of_their_sum(tmp_path):
    """A step of one backward is reduced right after it; when a later step has two micro-batches, that early
    reduction is dropped and their summed gradients are reduced instead (cosines and norms exact)."""
    from test_conflict import task_grads

    torch.manual_seed(0)
    model = MMoE(in_dim=128, tasks=["a", "b"], n_experts=2, expert_hidden=[256], expert_dim=64, tower_hidden=[8])
    twin = copy.deepcopy(model)
    losses = data_losses(n=64)
    micro_batches = {1: 1, 2: 2, 3: 2, 4: 1}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    measured = []
    with gw.GateWatch(model, tasks=["a", "b"], log_dir=tmp_path / "run", tensorboard=False, conflict_every=1) as w:
        for step, count in micro_batches.items():
            twin.load_state_dict(model.state_dict())
            batches = [lambda m=m, s=step: losses(twin, 10 * s + m) for m in range(count)]
            measured.append((step, task_grads(twin, batches, ["a", "b"])[0]))
            for m in range(count):
                w.backward(losses(model, 10 * step + m))
            opt.step()
            opt.zero_grad()
            w.step()
    conflict = gw.load_run(tmp_path / "run").table("conflict")
    for step, grads in measured:
        rows = conflict[(conflict["step"] == step) & (conflict["scope"] == "param")].set_index("name")
        assert len(rows) == 8  # the experts' 2 x (weight, bias) x 2 layers
        for name, row in rows.iterrows():
            ref = pair_reference(grads["a"][name], grads["b"][name])
            assert row["cosine"] == pytest.approx(ref["cosine"], abs=2e-5), (step, name)
            assert row["norm_b"] == pytest.approx(ref["norm_b"], rel=2e-5), (step, name)


def test_long_runs_counted_whole_are_copied_and_the_rest_gathered_by_position():
    """Units counted whole that lie side by side, 16,384 elements or more in all, are one copy; sampled units and
    shorter runs counted whole are gathered by position, adjacent ones in one piece."""
    units = [(0, 10_000), (10_000, 20_000), (20_000, 30_000), (30_000, 70_000), (70_000, 70_100),
             (70_100, 110_100)]
    sample = SignSample.plan(units, units, 2, torch.empty(4, 110_100))
    assert [(start, n, source if isinstance(source, int) else len(source)) for start, n, source in sample.pieces] == [
        (0, 30_000, 0), (30_000, 2 * SAMPLE_SIZE + 100, 2 * SAMPLE_SIZE + 100)]
    g = torch.randn(2, 110_100, generator=torch.Generator().manual_seed(0))
    out = torch.empty(2, 30_100 + 2 * SAMPLE_SIZE)
    sample.gather(g, out)
    assert torch.equal(out, g[:, sample.positions()])
