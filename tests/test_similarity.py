"""Expert similarity: linear CKA and mean-output cosine against numpy, hooks on real models, the finding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import gatewatch as gw
from gatewatch.gating.discovery import resolve
from gatewatch.gating.expert_map import map_experts
from gatewatch.gating.specs import ResolvedGate
from gatewatch.loaded_run import Run
from gatewatch.models import PLE, MMoE
from gatewatch.quantities.similarity.experts import expert_pools
from gatewatch.quantities.similarity.maths import similarity_matrices
from gatewatch.quantities.similarity.read import redundant_experts
from gatewatch.rules import Thresholds
from gatewatch.schema import frame


def cka_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA in its Gram (kernel) form, HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = X X^T."""
    n = len(x)
    h = np.eye(n) - 1.0 / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.sum(k * l_) / np.sqrt(np.sum(k * k) * np.sum(l_ * l_)))


def cosine_numpy(x: np.ndarray, y: np.ndarray) -> float:
    a, b = x.mean(0), y.mean(0)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def matrices(*xs: np.ndarray) -> np.ndarray:
    return similarity_matrices([torch.from_numpy(x).float() for x in xs]).numpy()


@pytest.mark.slow
def test_cka_and_cosine_match_numpy_identical_random_and_rotated() -> None:
    rng = np.random.default_rng(0)
    n, d = 1024, 128
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 0.5
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mixed = x + 0.5 * y
    cka, cosine = matrices(x, x.copy(), y, x @ rotation, mixed, 3.0 * mixed @ rotation)
    assert cka[0, 1] == pytest.approx(1.0, abs=1e-5)  # identical experts
    assert cka[0, 3] == pytest.approx(1.0, abs=1e-5)  # a rotation of another expert
    assert cka[2, 4] == pytest.approx(cka[2, 5], abs=1e-5)  # invariant to rotating (and scaling) one side
    for a, b in [(0, 2), (2, 4), (0, 4), (3, 5)]:
        xa, xb = [x, x, y, x @ rotation, mixed, 3.0 * mixed @ rotation][a], \
            [x, x, y, x @ rotation, mixed, 3.0 * mixed @ rotation][b]
        assert cka[a, b] == pytest.approx(cka_numpy(xa, xb), abs=1e-4)
        assert cosine[a, b] == pytest.approx(cosine_numpy(xa, xb), abs=1e-5)
    assert 0.07 < cka[0, 2] < 0.15  # independent random features (n 1024, d 128): about 0.1, not 0
    np.testing.assert_allclose(cka, cka.T, atol=1e-6)


def test_experts_of_different_widths_get_cka_but_no_cosine() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, 8)), rng.normal(size=(200, 5))
    cka, cosine = matrices(x, y)
    assert cka[0, 1] == pytest.approx(cka_numpy(x, y), abs=1e-4)
    assert np.isnan(cosine[0, 1])


def mapped_gates(model: torch.nn.Module) -> list[ResolvedGate]:
    gates = resolve(model, ["a", "b"], None)
    for gate in gates:
        map_experts(model, gate, len(gate.experts or []), ["a", "b"])
    return gates


def test_pools_of_the_reference_models() -> None:
    mmoe = MMoE(in_dim=6, tasks=["a", "b"], n_experts=3)
    (pool,) = expert_pools(mmoe, mapped_gates(mmoe))
    assert (pool.name, pool.gates, pool.labels) == ("experts", ["a", "b"], ["0", "1", "2"])
    assert all(m is e for m, e in zip(pool.modules, mmoe.experts, strict=True))
    ple = PLE(in_dim=6, tasks=["a", "b"], n_levels=2, n_specific=2, n_shared=1)
    pools = {p.name: p for p in expert_pools(ple, mapped_gates(ple))}
    assert set(pools) == {"a.l0", "b.l0", "shared.l0", "a.l1", "b.l1"}
    level = ple.levels[1]
    assert pools["b.l1"].modules == [*level.specific["b"], *level.shared] if level.expert_order == "specific_first" \
        else [*level.shared, *level.specific["b"]]


def test_logged_similarity_matches_numpy_on_the_measured_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MMoE(in_dim=6, tasks=["a", "b"], n_experts=3, expert_hidden=(8,), expert_dim=5)
    watch = gw.GateWatch(model, tasks=["a", "b"], log_dir=tmp_path, similarity_every=2, similarity_rows=20,
                         tensorboard=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = {}
    for step in range(1, 5):
        x = torch.randn(32, 6)
        with torch.no_grad():
            outs = [e(x[:20]).numpy().astype(np.float64) for e in model.experts]
        expected[step] = {(a, b): (cka_numpy(outs[a], outs[b]), cosine_numpy(outs[a], outs[b]))
                          for a in range(3) for b in range(a + 1, 3)}
        watch.backward({t: p.pow(2).mean() for t, p in zip(["a", "b"], model(x), strict=True)})
        opt.step()
        opt.zero_grad()
        watch.step()
    watch.close()
    table = gw.load_run(tmp_path).table("similarity")
    assert sorted(table["step"].unique()) == [2, 4] and len(table) == 6
    for row in table.itertuples():
        cka, cosine = expected[row.step][(int(row.expert_a), int(row.expert_b))]
        assert row.cka == pytest.approx(cka, abs=1e-4)
        assert row.mean_cosine == pytest.approx(cosine, abs=1e-5)
    assert gw.load_run(tmp_path).meta["similarity"]["pools"]["experts"]["gates"] == ["a", "b"]


def test_similarity_rows_is_bounded() -> None:
    model = MMoE(in_dim=6, tasks=["a", "b"], n_experts=2)
    with pytest.raises(ValueError, match="similarity_rows is at most 1024"):
        gw.GateWatch(model, tasks=["a", "b"], log_dir="unused", similarity_rows=4096)


def similarity_run(cka_by_step: dict[int, float]) -> Run:
    rows = [{"step": s, "pool": "experts", "expert_a": "0", "expert_b": "1", "cka": c, "mean_cosine": 0.9}
            for s, c in cka_by_step.items()]
    rows += [{"step": s, "pool": "experts", "expert_a": "0", "expert_b": "2", "cka": 0.3, "mean_cosine": 0.5}
             for s in cka_by_step]
    return Run(Path("r"), {}, {"similarity": frame("similarity", rows)}, "finished")


def test_redundant_experts_fires_on_every_recent_measurement_at_or_above_the_threshold() -> None:
    th = Thresholds(redundant_cka=0.9, redundant_steps=3)
    (found,) = redundant_experts(similarity_run({50: 0.5, 100: 0.95, 150: 0.9, 200: 0.97}), th)
    assert (found.code, found.severity, found.step, found.chart) == ("redundant_experts", "warning", 200, "experts")
    assert "0 ~ 1" in found.message and "0 ~ 2" not in found.message and "fewer experts" in found.remedy
    assert redundant_experts(similarity_run({50: 0.95, 100: 0.95, 150: 0.89, 200: 0.97}), th) == []
    assert redundant_experts(similarity_run({50: 0.99}), th) == []  # one measurement is not a trend


def test_figures_draw_the_matrix_at_each_step_and_the_trend() -> None:
    from gatewatch.figures import similarity_matrix, similarity_over_time

    table = similarity_run({50: 0.5, 100: 0.95}).table("similarity")
    fig = similarity_matrix(table, threshold=0.9)
    nan = np.nan  # experts 1 ~ 2 have no row: left blank
    np.testing.assert_allclose(fig.data[0].z, [[1, 0.95, 0.3], [0.95, 1, nan], [0.3, nan, 1]])
    slider = fig.layout.sliders[0]
    assert [s.label for s in slider.steps] == ["50", "100"] and slider.active == 1
    np.testing.assert_allclose(slider.steps[0].args[0]["z"][0][0], [1, 0.5, 0.3])
    trend = similarity_over_time(table, threshold=0.9)
    assert list(trend.data[0].y) == [0.5, 0.95] and list(trend.data[1].y) == pytest.approx([0.4, 0.625])
    empty = similarity_matrix(table.iloc[0:0])
    assert "no expert similarity" in empty.layout.annotations[0].text
