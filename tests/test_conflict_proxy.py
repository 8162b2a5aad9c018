"""The conflict proxy: gate weight x gradient at each task's tower input, checked against numpy on the same
gradients taken by autograd, training unchanged with it on, towers inferred or asked for."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_conflict import data_losses
from torch import nn

import gatewatch as gw
from gatewatch.gating.expert_map import ExpertMapError, find_towers
from gatewatch.models import PLE, MMoE
from gatewatch.report import build_report


def proxy_reference(model: nn.Module, step: int, gate_paths: dict[str, str], tower_paths: dict[str, str],
                    maps: dict[str, list[str]]) -> dict[tuple[str, str, str], float]:
    """(module, a, b) -> proxy cosine by numpy: q_k[n, m] <d_a(n), d_b(n)> summed over samples."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = [modules[p].register_forward_hook(lambda _m, _i, o, t=t: seen.__setitem__("g" + t, o.detach()))
               for t, p in gate_paths.items()]
    handles += [modules[p].register_forward_pre_hook(lambda _m, i, t=t: seen.__setitem__("h" + t, i[0]))
                for t, p in tower_paths.items()]
    losses = data_losses()(model, step)
    for h in handles:
        h.remove()
    tasks = list(losses)
    d = {t: torch.autograd.grad(losses[t], seen["h" + t], retain_graph=True)[0].double().numpy() for t in tasks}
    g = {t: seen["g" + t].double().numpy() for t in tasks}
    names = list(dict.fromkeys(m for t in tasks for m in maps[t]))
    q = {t: np.stack([g[t][:, maps[t].index(m)] if m in maps[t] else np.zeros(len(g[t])) for m in names], 1)
         for t in tasks}
    out = {}
    for i, a in enumerate(tasks):
        for b in tasks[i + 1:]:
            inner, na, nb = (d[a] * d[b]).sum(1), (d[a] ** 2).sum(1), (d[b] ** 2).sum(1)
            for j, m in enumerate(names):
                dot = (q[a][:, j] * q[b][:, j] * inner).sum()
                den = np.sqrt((q[a][:, j] ** 2 * na).sum() * (q[b][:, j] ** 2 * nb).sum())
                out[(m, a, b)] = float(dot / den) if den > 0 else 0.0
    return out


@pytest.mark.parametrize("make", [
    lambda: MMoE(in_dim=12, tasks=["ctr", "like", "buy"], n_experts=3, expert_hidden=(8,), expert_dim=6),
    lambda: PLE(in_dim=12, tasks=["ctr", "like"], n_levels=2, n_specific=1, n_shared=2, expert_hidden=(8,),
                expert_dim=6),
], ids=["mmoe", "ple"])
@pytest.mark.slow
def test_proxy_matches_numpy_and_leaves_training_alone(make, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = make()
    plain, twin = copy.deepcopy(model), copy.deepcopy(model)
    losses, tasks, steps = data_losses(), list(model.tasks), 4
    watch = gw.GateWatch(model, tasks=tasks, log_dir=tmp_path / "run", tensorboard=False, every=2, flush_every=4,
                         conflict_every=2, conflict_proxy=True)
    proxy = next(q for q in watch.quantities if q.name == "proxy")
    gate_paths, tower_paths = {t: g.path for t, g in proxy.gates.items()}, proxy.tower_paths
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, plain)]
    expected = {}
    for step in range(1, steps + 1):
        for m, opt in ((model, opts[0]), (plain, opts[1])):
            if m is model:
                if step > 1:
                    twin.load_state_dict(model.state_dict())
                    maps = {t: g.expert_modules for t, g in proxy.gates.items()}
                    expected[step] = proxy_reference(twin, step, gate_paths, tower_paths, maps)
                watch.backward(losses(m, step))
            else:
                sum(losses(m, step).values()).backward()
            opt.step()
            opt.zero_grad()
        watch.step()
    watch.close()
    for (name, a), (_, b) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(a, b), name  # the proxy (and exact conflict) change no trained parameter
    run = gw.load_run(tmp_path / "run")
    table = run.table("conflict_proxy")
    assert sorted(table["step"].unique()) == list(range(1, steps + 1))
    for step, reference in expected.items():
        got = table[table["step"] == step].set_index(["name", "task_a", "task_b"])["cosine"]
        assert set(reference) == set(got.index)
        for key, cosine in reference.items():
            assert got[key] == pytest.approx(cosine, abs=1e-6), (step, key)
    modes = {e["mode"] for e in build_report(run)["expert_conflict"]}
    assert modes == {"exact", "proxy"}


def test_towers_inferred_or_asked_for() -> None:
    model = MMoE(in_dim=4, tasks=["a", "b"], n_experts=2)
    assert find_towers(model, ["a", "b"]) == {"a": "towers.a", "b": "towers.b"}
    assert find_towers(model, ["a", "b"], {"a": "towers.b", "b": "towers.a"}) == {"a": "towers.b", "b": "towers.a"}

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out_a, self.out_b = nn.Linear(2, 1), nn.Linear(2, 1)

    with pytest.raises(ExpertMapError, match=r"Pass towers=\{'a': "):
        find_towers(Odd(), ["a", "b"])
    with pytest.raises(ExpertMapError, match="names no module"):
        find_towers(model, ["a", "b"], {"a": "towers.a", "b": "nope"})


def test_proxy_scalars_are_labelled_proxy() -> None:
    from gatewatch.sinks.scalars import scalars

    rows = pd.DataFrame({"step": [3], "name": ["experts.0"], "task_a": ["a"], "task_b": ["b"], "cosine": [-0.5],
                         "norm_a": [1.0], "norm_b": [2.0], "below": [1], "zero_grad": [False]})
    assert scalars({"conflict_proxy": rows}) == [("conflict_proxy/a~b/module/experts.0/cosine", -0.5, 3)]


@pytest.mark.slow
def test_proxy_folds_early_when_it_holds_too_much(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Held inner products stay bounded: folding every step gives the same table as folding at the flush."""
    from gatewatch.quantities.conflict_proxy import capture

    tables = []
    for limit in (capture.HOLD_ELEMENTS, 1):
        monkeypatch.setattr(capture, "HOLD_ELEMENTS", limit)
        torch.manual_seed(0)
        model = MMoE(in_dim=12, tasks=["ctr", "like"], n_experts=2, expert_hidden=(4,), expert_dim=3)
        folder = tmp_path / str(limit)
        with gw.GateWatch(model, tasks=["ctr", "like"], log_dir=folder, tensorboard=False, flush_every=4,
                          conflict_proxy=True) as watch:
            proxy = next(q for q in watch.quantities if q.name == "proxy")
            for step in range(1, 5):
                watch.backward(data_losses(16)(model, step))
                watch.step()
                assert len(proxy._held) <= (4 if limit > 1 else 0)
        tables.append(gw.load_run(folder).table("conflict_proxy"))
    assert len(tables[0]) == 4 * 2
    pd.testing.assert_frame_equal(tables[0], tables[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_per_sample_inner_products_match_float64(dtype: torch.dtype) -> None:
    """Each step's gradients are reduced to per-sample inner products at once: within 1e-6 (relative to the
    products' magnitude) of float64 maths on the same values, half precision included."""
    from gatewatch.quantities.conflict_proxy.capture import sample_inner

    g = torch.Generator().manual_seed(0)
    d = [torch.randn(64, 48, generator=g).to(dtype) for _ in range(3)]
    got = sample_inner(d)
    exact = [x.double().numpy() for x in d]
    pairs = [(a, b) for a in range(3) for b in range(a, 3)]
    assert got.dtype == torch.float64 and got.shape == (64, len(pairs))
    for column, (a, b) in enumerate(pairs):
        reference = (exact[a] * exact[b]).sum(-1)
        scale = np.abs(exact[a] * exact[b]).sum(-1)
        assert np.all(np.abs(got[:, column].numpy() - reference) <= 1e-6 * scale), (dtype, a, b)
