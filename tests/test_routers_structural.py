"""Sparse routers outside the known-class table, found by what they return: ``(logits, weights, indices)``.

Small custom MoE models whose routers are not in ``KNOWN``: each is found with no ``gates=``, its scoring is
inferred from one probe of a copy of it, and the logged dispatch load equals the load computed here from the
router's own indices (captured by a separate hook).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gatewatch as gw
from gatewatch.gating.discovery import resolve
from gatewatch.gating.router_probe import probe_router, structural_routers
from gatewatch.run_reader import load_run

D, E, K = 8, 6, 2
STEPS, EVERY, TOKENS = 4, 2, 32


class SoftmaxRouter(nn.Module):
    """Mixtral-style: softmax, top k, the chosen weights renormalised."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, E)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.proj(h)
        w, idx = torch.softmax(logits, -1).topk(K, dim=-1)
        return logits, w / w.sum(-1, keepdim=True), idx


class SigmoidRouter(nn.Module):
    """DeepSeek-style without groups: sigmoid scores, the expert bias only in the choice, renormalised."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D) * 0.5)
        self.register_buffer("expert_bias", torch.tensor([0.9, -0.9, 0.6, -0.6, 0.3, -0.3]))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = h @ self.weight.T
        scores = torch.sigmoid(logits)
        idx = (scores + self.expert_bias).topk(K, dim=-1)[1]
        w = scores.gather(1, idx)
        return logits, w / w.sum(-1, keepdim=True), idx


class TemperatureRouter(SoftmaxRouter):
    """Weights from a softmax at temperature 3: no scoring gatewatch knows reproduces them."""

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.proj(h)
        idx = logits.topk(K, dim=-1)[1]
        w = torch.softmax(logits / 3, -1).gather(1, idx)
        return logits, w / w.sum(-1, keepdim=True), idx


class CountingRouter(SoftmaxRouter):
    """A router whose forward changes its own buffer and draws from the global random state."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.noise = nn.Dropout(0.5)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.calls += 1
        torch.rand(1)
        return super().forward(self.noise(h))


class MoELayer(nn.Module):
    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.router = router
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        _, w, idx = self.router(h)
        return h + sum((w * (idx == e)).sum(-1, keepdim=True) * ex(h) for e, ex in enumerate(self.experts))


class TinyMoE(nn.Module):
    def __init__(self, router: type[nn.Module], layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(MoELayer(router()) for _ in range(layers))
        self.head = nn.Linear(D, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return self.head(h).squeeze(-1)


def train(model: TinyMoE, log_dir: Path) -> tuple[gw.GateWatch, list[list[tuple[torch.Tensor, ...]]]]:
    """A few steps under a zero-config GateWatch; each router's outputs per step, captured by our own hook."""
    seen: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in model.layers]
    for i, layer in enumerate(model.layers):
        layer.router.register_forward_hook(
            lambda _m, _i, out, i=i: seen[i].append(tuple(t.detach().clone() for t in out)))
    model.train()
    watch = gw.GateWatch(model, log_dir=log_dir, every=EVERY, tensorboard=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        h = torch.randn(TOKENS, D, generator=gen)
        model(h).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        watch.step()
    watch.close()
    assert all(len(s) == STEPS for s in seen)  # the probe never called the live routers
    return watch, seen


def logged(table: Any, path: str, step: int, column: str) -> np.ndarray:
    rows = table[(table["gate"] == path) & (table["step"] == step)].sort_values("expert")
    return rows[column].to_numpy(float)


def own_load(outs: list[tuple[torch.Tensor, ...]]) -> np.ndarray:
    """Share of tokens dispatched to each expert, from the router's own indices."""
    idx = torch.cat([o[2] for o in outs]).numpy()
    return np.bincount(idx.ravel(), minlength=E) / len(idx)


def check_load(run: gw.Run, seen: list[list[tuple[torch.Tensor, ...]]]) -> None:
    experts = run.table("router_experts")
    for i, outs in enumerate(seen):
        for end in range(EVERY, STEPS + 1, EVERY):
            ref = own_load(outs[end - EVERY:end])
            np.testing.assert_allclose(logged(experts, f"layers.{i}.router", end, "load"), ref, atol=1e-12)
            assert ref.sum() == pytest.approx(K)


def router_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "sparse router" in str(w.message)]


def test_softmax_router_found_with_no_arguments_and_its_load_is_its_own_dispatch(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch, seen = train(TinyMoE(SoftmaxRouter), tmp_path)
    assert router_warnings(caught) == []
    assert [g.name for g in watch.gates] == ["layers.0.router", "layers.1.router"]
    for g in watch.gates:
        assert (g.router.scoring, g.router.top_k, g.router.renormalize, g.router.scale, g.router.bias) == (
            "softmax", K, True, 1.0, None)
        assert g.top_k == K and g.task is None
    run = load_run(tmp_path)
    check_load(run, seen)
    shares = run.table("shares")
    logits = torch.cat([o[0] for o in seen[1][STEPS - EVERY:]]).double()
    np.testing.assert_allclose(logged(shares, "layers.1.router", STEPS, "share"),
                               torch.softmax(logits, -1).mean(0).numpy(), atol=1e-6)


def test_sigmoid_router_with_expert_bias_is_read_as_sigmoid_and_loads_its_own_choice(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch, seen = train(TinyMoE(SigmoidRouter), tmp_path)
    assert router_warnings(caught) == []
    router = watch.gates[0].router
    assert (router.scoring, router.top_k, router.renormalize, router.bias) == ("sigmoid", K, True, "expert_bias")
    run = load_run(tmp_path)
    check_load(run, seen)
    experts, shares = run.table("router_experts"), run.table("shares")
    for i, outs in enumerate(seen):
        path, window = f"layers.{i}.router", outs[STEPS - EVERY:]
        logits = torch.cat([o[0] for o in window]).double()
        plain = logits.topk(K, dim=-1)[1].numpy()  # the top k of the scores alone
        plain_load = np.bincount(plain.ravel(), minlength=E) / len(plain)
        assert np.abs(logged(experts, path, STEPS, "load") - plain_load).max() > 0.05  # the bias moved tokens
        s = torch.sigmoid(logits)
        np.testing.assert_allclose(logged(shares, path, STEPS, "share"),
                                   (s / s.sum(-1, keepdim=True)).mean(0).numpy(), atol=1e-6)
    assert (run.table("routers")["bias_changed"] > 0).all()


class SoftGate(nn.Module):
    """A dense gate: one probability tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, E)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.proj(h), -1)


class GatedMLP(nn.Module):
    """A SwiGLU MLP whose gate_proj and Qwen2-MoE-style shared_expert_gate return router-shaped tuples."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.shared_expert_gate = SoftmaxRouter(), SoftmaxRouter()
        self.up_proj, self.down_proj = nn.Linear(D, E), nn.Linear(E, D)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_proj(h)[0] * self.up_proj(h) * self.shared_expert_gate(h)[1].sum())


class NotRouters(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.mlp = SoftGate(), GatedMLP()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h) * self.gate(h).sum(-1, keepdim=True)


def test_single_tensor_gate_and_mlp_projections_are_not_routers() -> None:
    model = NotRouters()
    assert probe_router("router", model.mlp.gate_proj) is not None  # router-shaped: only the names rule it out
    assert probe_router("gate", model.gate) is None
    assert structural_routers(model) == []
    with pytest.raises(gw.GateDiscoveryError) as err:
        resolve(model, None, None)
    message = str(err.value)
    assert "'gate.proj'" in message
    assert "gate_proj" not in message and "shared_expert_gate" not in message and "sparse router" not in message


def test_unknown_scoring_warns_with_the_router_to_pass_and_still_logs_the_dispatch(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="match no softmax or sigmoid") as caught:
        watch, seen = train(TinyMoE(TemperatureRouter), tmp_path)
    messages = router_warnings(list(caught))
    assert len(messages) == 2  # one per layer
    assert 'gw.Gate("layers.0.router", router=gw.Router(scoring="softmax", top_k=2))' in messages[0]
    assert "'layers.0.router' (TemperatureRouter)" in messages[0]
    assert watch.gates[0].router.scoring == "softmax" and not watch.gates[0].router.renormalize
    check_load(load_run(tmp_path), seen)


def test_probe_leaves_the_live_module_untouched() -> None:
    model = TinyMoE(CountingRouter)
    model.train()
    model.layers[1].router.noise.eval()
    live = model.layers[0].router
    calls: list[int] = []
    live.register_forward_hook(lambda *_: calls.append(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    found = structural_routers(model)
    assert [p.path for p in found] == ["layers.0.router", "layers.1.router"]
    assert found[0].module is live
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert int(live.calls) == 0 and calls == []
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_zero_initialised_router_is_read_from_spread_logits() -> None:
    router = SigmoidRouter()
    with torch.no_grad():
        router.weight.zero_()  # equal logits: every scoring gives the same weights
    probed = probe_router("router", router)
    assert probed is not None and probed.doubt is None
    assert (probed.router.scoring, probed.router.renormalize) == ("sigmoid", True)
    assert not router.weight.any()


class MixedGates(nn.Module):
    """A router next to task gates: Linear layers with a functional softmax, or nn.Softmax modules."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.router = SoftmaxRouter()
        self.gate_ctr = nn.Linear(D, E) if functional else nn.Sequential(nn.Linear(D, E), nn.Softmax(-1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.router(h)[1].sum() + self.gate_ctr(h).sum()


def test_a_router_next_to_other_gates_is_not_taken_alone() -> None:
    with pytest.raises(gw.GateDiscoveryError) as err:
        resolve(MixedGates(functional=True), ["ctr"], None)
    message = str(err.value)
    assert "'gate_ctr'" in message
    assert 'gw.Gate("router", router=gw.Router(scoring="softmax", top_k=2, renormalize=True))' in message
    gates = resolve(MixedGates(functional=False), ["ctr"], None)
    assert [(g.path, g.task, g.router) for g in gates] == [("gate_ctr.1", "ctr", None)]


@pytest.mark.parametrize(("family", "scoring", "renormalize", "scale", "bias", "doubt"), [
    ("mixtral", "softmax", True, 1.0, None, False),
    ("gpt_oss", "softmax", True, 1.0, None, False),  # a softmax over the top-k logits = renormalised softmax
    ("deepseek_v3", "sigmoid", True, 2.5, "e_score_correction_bias", True),  # its group limit is not inferred
])
def test_the_probe_reads_transformers_routers_as_their_table_entry(
        family: str, scoring: str, renormalize: bool, scale: float, bias: str | None, doubt: bool) -> None:
    pytest.importorskip("transformers")
    from _hf_moe import build

    from gatewatch.gating.router_table import find_routers

    path, module, known = find_routers(build(family))[-1]
    probed = probe_router(path, module)
    assert probed is not None
    r = probed.router
    assert (r.scoring, r.top_k, r.renormalize, r.scale, r.bias) == (scoring, known.top_k, renormalize, scale, bias)
    if known.scoring != "softmax_topk":
        assert (known.scoring, known.renormalize, known.scale, known.bias) == (scoring, renormalize, scale, bias)
    assert (probed.doubt is not None) == doubt
    if doubt:
        assert "not the top 2" in probed.doubt and "groups=" in probed.doubt
