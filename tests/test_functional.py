"""Every gate metric against a plain-numpy reference, edge cases included; and the accumulator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gatewatch.capture.quantity import CaptureContext
from gatewatch.capture.reducer import Reducer
from gatewatch.gating.specs import ResolvedGate
from gatewatch.maths.gate_metrics import drift_bits, js_bits
from gatewatch.maths.gate_sums import (
    Layout,
    entropy,
    normalized_entropy,
    window_metrics,
    window_sums,
)
from gatewatch.quantities.gates.capture import GateStatistics
from gatewatch.stats import load_cv

THRESHOLD, BINS, MARGIN = 0.9, 20, 0.05


# ---------------------------------------------------------------- plain numpy references
def np_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats along the last axis, 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(-1)


def np_js_bits(p: np.ndarray, q: np.ndarray) -> float:
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float((a[mask] * np.log(a[mask] / b[mask])).sum())

    return (kl(p, m) + kl(q, m)) / 2 / np.log(2)


def np_metrics(p: np.ndarray, top_k: int | None = None) -> dict[str, object]:
    """The published gate metrics, written out plainly, for one gate's outputs ``p [N, E]`` (NaN/Inf rows left out)."""
    ok = np.isfinite(p).all(1)
    q = p[ok]
    n, e = q.shape
    log_e = np.log(e) if e > 1 else None
    share = q.mean(0)
    h = np_entropy(q)
    h_mean = float(np_entropy(share))
    top = q.max(1)
    out: dict[str, object] = {
        "samples": float(n),
        "nonfinite": float((~ok).sum()),
        "share": share,
        "std": q.std(0),
        "top1": np.bincount(q.argmax(1), minlength=e) / n,
        "entropy": h.mean() / log_e if log_e else 0.0,
        "entropy_of_mean": h_mean / log_e if log_e else 0.0,
        "mutual_info": max(h_mean - h.mean(), 0.0) / log_e if log_e else 0.0,
        "effective_experts": np.exp(h_mean),
        "polarization": float((top >= THRESHOLD).mean()),
        "max_weight": float(top.mean()),
        "spread": float(q.std(0).mean()),
        "hist": np.bincount(np.clip(np.floor(q * BINS).astype(int), 0, BINS - 1).ravel(), minlength=BINS),
    }
    if top_k is not None:
        order = np.argsort(-q, axis=1, kind="stable")
        chosen = np.zeros_like(q)
        np.put_along_axis(chosen, order[:, :top_k], 1.0, axis=1)
        out["selected"] = chosen.mean(0)
        srt = -np.sort(-q, axis=1)
        out["small_margin"] = float((srt[:, top_k - 1] - srt[:, top_k] < MARGIN).mean()) if top_k < e else 0.0
    return out


def metrics_of(p: np.ndarray, top_k: int | None = None) -> dict[str, object]:
    """window_metrics(window_sums(p)) for one gate, as numpy."""
    t = torch.from_numpy(p).unsqueeze(0)
    sums = window_sums(t, threshold=THRESHOLD, bins=BINS, top_k=top_k, margin=MARGIN)[0].double()
    m = window_metrics(sums, Layout(p.shape[1], BINS))
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in m.items()}


def assert_matches(ours: dict[str, object], ref: dict[str, object], keys: list[str] | None = None) -> None:
    """Equal up to float64 rounding; std is the square root of E[p^2] - E[p]^2, so near 0 it keeps ~1e-8."""
    for key in keys or list(ref):
        atol = 1e-7 if key in ("std", "spread") else 1e-9
        np.testing.assert_allclose(np.asarray(ours[key], dtype=float), np.asarray(ref[key], dtype=float),
                                   rtol=1e-9, atol=atol, err_msg=key)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(1, keepdims=True)


# ---------------------------------------------------------------- window metrics
@pytest.mark.parametrize("e", [2, 3, 8])
@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_random_gates_match_numpy(e: int, scale: float) -> None:
    p = softmax(np.random.default_rng(e).normal(scale=scale, size=(500, e)))
    assert_matches(metrics_of(p), np_metrics(p))


def test_one_hot_gate() -> None:
    rng = np.random.default_rng(1)
    p = np.eye(4)[rng.integers(0, 4, size=300)]
    ours, ref = metrics_of(p), np_metrics(p)
    assert_matches(ours, ref)
    assert ours["entropy"] == 0 and ours["polarization"] == 1 and ours["max_weight"] == 1
    assert ours["mutual_info"] == pytest.approx(ours["entropy_of_mean"])  # all routing information is input-driven
    assert ours["hist"][0] == 3 * 300 and ours["hist"][-1] == 300  # a weight of exactly 1 lands in the last bin


def test_uniform_gate() -> None:
    e = 5
    p = np.full((100, e), 1 / e)
    ours = metrics_of(p, top_k=2)
    assert_matches(ours, np_metrics(p), ["samples", "share", "std", "entropy", "entropy_of_mean", "mutual_info",
                                         "effective_experts", "polarization", "max_weight", "spread", "hist"])
    assert ours["entropy"] == pytest.approx(1) and ours["entropy_of_mean"] == pytest.approx(1)
    assert ours["mutual_info"] == pytest.approx(0, abs=1e-12)
    assert ours["effective_experts"] == pytest.approx(e)
    assert ours["polarization"] == 0 and ours["small_margin"] == 1  # every k-th / (k+1)-th pair is tied
    assert ours["top1"].sum() == pytest.approx(1) and ours["selected"].sum() == pytest.approx(2)  # ties: any choice


def test_single_expert() -> None:
    p = np.ones((50, 1))
    ours = metrics_of(p)
    assert_matches(ours, np_metrics(p))
    assert ours["entropy"] == 0 and ours["mutual_info"] == 0 and ours["effective_experts"] == 1
    assert ours["polarization"] == 1 and ours["share"].tolist() == [1.0]


def test_two_experts_closed_form() -> None:
    a = np.linspace(0.0, 1.0, 11)
    p = np.stack([a, 1 - a], 1)
    ours = metrics_of(p)
    assert_matches(ours, np_metrics(p))
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nansum(np.stack([a * np.log(a), (1 - a) * np.log(1 - a)]), 0)  # nan from 0 log 0 dropped
    assert ours["entropy"] == pytest.approx(h.mean() / np.log(2))
    assert ours["entropy_of_mean"] == pytest.approx(1.0)  # the mean gate is (0.5, 0.5)


def test_zeros_after_masking() -> None:
    """Masking expert e (logit -inf) gives exact zeros: no NaN from 0 log 0, and e gets share 0."""
    z = np.random.default_rng(3).normal(size=(200, 6))
    z[:, [1, 4]] = -np.inf
    p = torch.softmax(torch.from_numpy(z), -1).numpy()
    ours = metrics_of(p)
    assert_matches(ours, np_metrics(p))
    assert ours["share"][1] == 0 and ours["share"][4] == 0 and np.isfinite(ours["entropy"])


def test_nonfinite_rows_are_left_out_and_counted() -> None:
    p = softmax(np.random.default_rng(4).normal(size=(100, 4)))
    p[3, 1] = np.nan
    p[10, 0] = np.inf
    p[11] = -np.inf
    ours = metrics_of(p)
    assert ours["nonfinite"] == 3 and ours["samples"] == 97
    assert_matches(ours, np_metrics(p))  # the reference drops the same rows


def test_all_rows_nonfinite_gives_nan_metrics() -> None:
    p = np.full((5, 3), np.nan)
    ours = metrics_of(p)
    assert ours["samples"] == 0 and ours["nonfinite"] == 5
    assert math.isnan(ours["entropy"]) and np.isnan(ours["share"]).all()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_selected_share_and_small_margin(k: int) -> None:
    rng = np.random.default_rng(k)
    p = softmax(rng.normal(scale=2.0, size=(400, 6)))
    p[:40, :] = softmax(np.tile([[2.0, 1.99, 1.98, 0.0, 0.0, 0.0]], (40, 1)))  # near-ties at every k <= 3
    ours, ref = metrics_of(p, top_k=k), np_metrics(p, top_k=k)
    assert_matches(ours, ref, ["selected", "small_margin", "share"])
    assert ours["selected"].sum() == pytest.approx(k)
    assert ours["small_margin"] >= 0.1  # the 40 near-tied rows are close at position k


def test_top_k_not_below_experts_selects_every_expert() -> None:
    p = softmax(np.random.default_rng(0).normal(size=(30, 3)))
    ours = metrics_of(p, top_k=3)
    assert ours["selected"].tolist() == [1.0, 1.0, 1.0] and ours["small_margin"] == 0


def test_float32_input_matches_numpy() -> None:
    p = softmax(np.random.default_rng(7).normal(size=(256, 8))).astype(np.float32)
    ours, ref = metrics_of(p), np_metrics(p.astype(np.float64))
    for key in ["share", "std", "entropy", "entropy_of_mean", "mutual_info", "max_weight", "polarization"]:
        np.testing.assert_allclose(np.asarray(ours[key], float), np.asarray(ref[key], float), rtol=1e-5, atol=1e-6)


def test_window_sums_are_additive_over_batches_and_gates() -> None:
    """Sums of two halves equal the sums of the whole; stacked gates equal each gate alone."""
    rng = np.random.default_rng(5)
    p = torch.from_numpy(softmax(rng.normal(size=(2 * 120, 4))).reshape(2, 120, 4))
    p[1, 7, 2] = float("nan")
    kw = {"threshold": THRESHOLD, "bins": BINS, "top_k": 2, "margin": MARGIN}
    whole = window_sums(p, **kw)
    halves = window_sums(p[:, :60], **kw) + window_sums(p[:, 60:], **kw)
    torch.testing.assert_close(whole, halves)
    torch.testing.assert_close(whole[1], window_sums(p[1:], **kw)[0])


# ---------------------------------------------------------------- other formulas
def test_entropy_functions() -> None:
    p = softmax(np.random.default_rng(8).normal(size=(10, 5)))
    p[0] = [1, 0, 0, 0, 0]
    np.testing.assert_allclose(entropy(torch.from_numpy(p)).numpy(), np_entropy(p), atol=1e-12)
    np.testing.assert_allclose(normalized_entropy(torch.from_numpy(p)).numpy(), np_entropy(p) / np.log(5))
    assert normalized_entropy(torch.ones(3, 1)).tolist() == [0.0, 0.0, 0.0]
    x = torch.from_numpy(p).requires_grad_()  # the differentiable path: dH/dp = -(log p + 1) where p > 0
    h = entropy(x)
    h.sum().backward()
    np.testing.assert_allclose(h.detach().numpy(), np_entropy(p), atol=1e-12)
    np.testing.assert_allclose(x.grad.numpy()[1:], -(np.log(p[1:]) + 1), atol=1e-12)
    assert x.data.numpy().tolist() == p.tolist()  # the input is left as it was


def test_js_divergence_matches_numpy() -> None:
    rng = np.random.default_rng(9)
    for _ in range(5):
        p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
        assert float(js_bits(p, q)) == pytest.approx(np_js_bits(p, q))
    one, other = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert float(js_bits(one, other)) == pytest.approx(1.0)  # disjoint: the maximum, 1 bit
    assert float(js_bits(one, one)) == 0.0


@pytest.mark.parametrize("start", [None, "earlier"])
def test_drift_of_many_windows_matches_a_window_by_window_loop(start) -> None:
    """Each window with samples against the last one before it with samples (windows without are NaN and skipped),
    across flushes through ``prev``."""
    rng = np.random.default_rng(10)
    share = rng.dirichlet(np.ones(5), size=9)
    valid = np.array([False, True, True, False, False, True, False, True, True])
    prev = rng.dirichlet(np.ones(5)) if start else None
    drift, last = drift_bits(share, valid, prev)
    expected, ref = [], prev
    for k in range(len(share)):
        if not valid[k]:
            expected.append(math.nan)
            continue
        expected.append(math.nan if ref is None else np_js_bits(ref, share[k]))
        ref = share[k]
    np.testing.assert_allclose(drift, expected, rtol=1e-12, atol=1e-15)  # NaN where NaN
    np.testing.assert_array_equal(last, ref)
    none, kept = drift_bits(share[:2], np.zeros(2, dtype=bool), prev)
    assert np.isnan(none).all() and kept is prev


def test_load_cv() -> None:
    u = np.array([0.5, 0.3, 0.1, 0.1])
    assert load_cv(u) == pytest.approx(u.std() / u.mean())
    assert load_cv(np.zeros(3)) is None


# ---------------------------------------------------------------- the gate-statistics quantity and the reducer
def gate_quantity(top_k: list[int | None]) -> tuple[GateStatistics, list[nn.Module]]:
    modules = [nn.Identity() for _ in top_k]
    gates = [ResolvedGate(f"g{i}", m, f"g{i}", task=f"t{i}", top_k=k)
             for i, (m, k) in enumerate(zip(modules, top_k, strict=True))]
    ctx = CaptureContext(nn.ModuleList(modules), None, gates, every=1, threshold=THRESHOLD, bins=BINS, margin=MARGIN,
                         distributed=False)
    return GateStatistics(ctx), modules


def host_windows(stats: GateStatistics, windows: list[int]) -> dict[str, np.ndarray]:
    return Reducer([stats]).reduce(windows)[0].get("gates", {})


def test_window_sums_of_several_windows_in_one_flush_and_first_nonfinite_step() -> None:
    rng = np.random.default_rng(10)
    stats, modules = gate_quantity([None, None, 2])
    batches = [torch.from_numpy(softmax(rng.normal(size=(3 * 50, 4))).reshape(3, 50, 4)) for _ in range(4)]
    batches[1][0, 5, 0] = float("nan")  # gate 0 goes bad at step 2 and again at step 4
    batches[3][0, 9, 1] = float("inf")
    batches[3][2, 0, 3] = float("nan")  # gate 2 (a top-2 gate, its own shape group) only at step 4
    for step, b in enumerate(batches, start=1):
        for gate, module in enumerate(modules):
            module(b[gate])
        stats.ctx.step = step
        stats.on_step(step)
        if step % 2 == 0:
            stats.on_window(step)
    host = host_windows(stats, [2, 4])  # two windows, reduced in one stacked pass
    assert [host[f"{g}.bad"][:, 0].tolist() for g in range(3)] == [[2, 4], [math.inf, math.inf], [math.inf, 4]]
    for w, (lo, hi) in enumerate([(0, 2), (2, 4)]):
        whole = torch.cat(batches[lo:hi], dim=1)
        for gate, top_k in [(0, None), (1, None), (2, 2)]:
            ref = window_sums(whole[gate : gate + 1], threshold=THRESHOLD, bins=BINS, top_k=top_k, margin=MARGIN)[0]
            torch.testing.assert_close(torch.from_numpy(host[f"{gate}"][w]), ref.double())
    stats.on_window(5)
    host = host_windows(stats, [5])  # the flush reset the windows
    assert all(float(np.abs(host[f"{g}"]).sum()) == 0 and host[f"{g}.bad"][0, 0] == math.inf for g in range(3))


def test_a_gate_called_twice_in_one_step_counts_twice() -> None:
    p = torch.softmax(torch.randn(20, 3), -1)
    stats, (module,) = gate_quantity([None])
    module(p)
    module(p)
    stats.on_step(1)
    stats.on_window(1)
    host = host_windows(stats, [1])
    torch.testing.assert_close(torch.from_numpy(host["0"][0]), 2 * window_sums(p[None], threshold=THRESHOLD,
                                                                              bins=BINS)[0].double())
