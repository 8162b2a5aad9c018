"""Sparse MoE routers: a tiny Mixtral-style (top-2) and Switch-style (top-1) layer stack built here.

Each router returns ``(logits, top-k weights, top-k indices)`` for hidden states ``[batch, seq, d]``;
gatewatch reads the logits (``extract=lambda out: out[0]``, ``output="logits"``) and flattens the
tokens. Every statistic is checked against plain numpy on the router logits captured by a separate hook.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gatewatch as gw
from gatewatch.report import build_report, render_text

D, BATCH, SEQ = 8, 3, 5
LAYERS = [(4, 2), (4, 2), (3, 1)]  # (experts, top-k) per layer: two Mixtral-style layers, one Switch-style
STEPS, EVERY, MARGIN = 6, 3, 0.05


class Router(nn.Module):
    """Linear router: (logits, weights, indices) of the top k experts of each token."""

    def __init__(self, n_experts: int, k: int, *, renormalize: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(D, n_experts)
        self.k, self.renormalize = k, renormalize

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.proj(h)
        weights, indices = logits.softmax(-1).topk(self.k, dim=-1)
        if self.renormalize:  # Mixtral renormalises the top-k weights; Switch keeps the router probability
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights, indices


class MoELayer(nn.Module):
    def __init__(self, n_experts: int, k: int) -> None:
        super().__init__()
        self.router = Router(n_experts, k, renormalize=k > 1)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(n_experts))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        _, weights, indices = self.router(h)
        out = h
        for e, expert in enumerate(self.experts):
            out = out + (weights * (indices == e)).sum(-1, keepdim=True) * expert(h)
        return out


class TinyMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(MoELayer(e, k) for e, k in LAYERS)
        self.head = nn.Linear(D, 1)
        with torch.no_grad():
            self.layers[0].router.proj.bias[3] = -30.0  # never among the top 2 (and it gets no gradient)
            self.layers[2].router.proj.bias[0] = 4.0  # the Switch layer sends almost everything to expert 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return self.head(h).squeeze(-1)


def router_gates() -> dict[str, gw.Gate]:
    return {f"layer{i}": gw.Gate(f"layers.{i}.router", output="logits", extract=lambda out: out[0], top_k=k)
            for i, (_, k) in enumerate(LAYERS)}


def train(log_dir: Path) -> list[list[np.ndarray]]:
    """Train a few steps under GateWatch; return each layer's router logits per step, as [tokens, E]."""
    model = TinyMoE()
    captured: list[list[np.ndarray]] = [[] for _ in LAYERS]
    for i, layer in enumerate(model.layers):
        layer.router.register_forward_hook(
            lambda _m, _i, out, i=i: captured[i].append(out[0].detach().reshape(-1, out[0].shape[-1]).double().numpy())
        )
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    with gw.GateWatch(model, gates=router_gates(), log_dir=log_dir, every=EVERY, flush_every=STEPS,
                      margin=MARGIN) as watch:
        for _ in range(STEPS):
            h = torch.randn(BATCH, SEQ, D, generator=g)
            loss = (model(h) - h.sum(-1)).pow(2).mean()
            watch.backward([loss])
            opt.step()
            opt.zero_grad()
            watch.step()
    return captured


def reference(logits: np.ndarray, k: int) -> dict[str, np.ndarray | float]:
    """Router statistics in plain numpy from logits [tokens, E]."""
    z = np.exp(logits - logits.max(1, keepdims=True))
    p = z / z.sum(1, keepdims=True)
    n, e = p.shape
    order = np.argsort(-p, axis=1)
    chosen = np.zeros_like(p)
    np.put_along_axis(chosen, order[:, :k], 1.0, axis=1)
    ranked = np.take_along_axis(p, order, axis=1)
    selected = chosen.mean(0)
    return {
        "share": p.mean(0), "selected": selected, "top1": np.bincount(order[:, 0], minlength=e) / n,
        "entropy": float(np.mean(-(p * np.log(np.maximum(p, 1e-300))).sum(1)) / np.log(e)),
        "small_margin": float(np.mean(ranked[:, k - 1] - ranked[:, k] < MARGIN)),
        "load_cv": float(selected.std() / selected.mean()),
    }


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> tuple[gw.Run, list[list[np.ndarray]]]:
    path = tmp_path_factory.mktemp("routers") / "run"
    captured = train(path)
    return gw.load_run(path), captured


@pytest.mark.parametrize("layer", range(len(LAYERS)))
def test_router_statistics_match_numpy(routed: tuple[gw.Run, list[list[np.ndarray]]], layer: int) -> None:
    run, captured = routed
    n_experts, k = LAYERS[layer]
    name = f"layer{layer}"
    for end in range(EVERY, STEPS + 1, EVERY):
        ref = reference(np.concatenate(captured[layer][end - EVERY : end]), k)
        row = run.gates[(run.gates["gate"] == name) & (run.gates["step"] == end)].iloc[0]
        assert row["samples"] == EVERY * BATCH * SEQ  # [batch, seq, E] outputs are counted per token
        assert row["experts"] == n_experts
        np.testing.assert_allclose(row["entropy"], ref["entropy"], rtol=1e-5)
        np.testing.assert_allclose(row["small_margin"], ref["small_margin"], atol=1e-12)
        shares = run.shares[(run.shares["gate"] == name) & (run.shares["step"] == end)].sort_values("expert")
        assert shares["expert_name"].tolist() == [f"{name}:{i}" for i in range(n_experts)]
        for col in ("share", "selected", "top1"):
            np.testing.assert_allclose(shares[col].to_numpy(float), ref[col], rtol=1e-5, atol=1e-7, err_msg=col)
        np.testing.assert_allclose(shares["selected"].sum(), k)  # each token picks k experts


def test_report_gives_load_balance_per_layer(routed: tuple[gw.Run, list[list[np.ndarray]]]) -> None:
    run, captured = routed
    report = build_report(run)
    assert report["unit"] == "layer" and report["tasks"] == ["task0"]  # the one loss, unnamed
    balance = {b["gate"]: b for b in report["balance"]}
    for layer, (_, k) in enumerate(LAYERS):
        ref = reference(np.concatenate(captured[layer][STEPS - EVERY :]), k)
        b = balance[f"layer{layer}"]
        assert b["top_k"] == k and b["step"] == STEPS
        np.testing.assert_allclose(b["load"], ref["selected"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(b["load_cv"], ref["load_cv"], rtol=1e-5)
        np.testing.assert_allclose(b["small_margin"], ref["small_margin"], atol=1e-12)
    assert balance["layer0"]["dead"] == ["layer0:3"]
    assert balance["layer1"]["dead"] == []
    assert balance["layer2"]["dead"] == ["layer2:1", "layer2:2"]
    dead = {report["experts"]["names"][i] for i in report["experts"]["dead"]}
    assert dead == {"layer0:3", "layer2:1", "layer2:2"}
    found = {(f["code"], f["gate"], f["expert"]) for f in report["findings"]}
    assert ("dead_expert", None, "layer0:3") in found
    assert ("polarization", "layer2", None) in found
    polarized = next(f for f in report["findings"] if f["code"] == "polarization")
    assert polarized["message"].startswith("layer 'layer2' is polarized") and "task" not in polarized["message"]
    text = render_text(report)
    assert "layers (last window):" in text and "task=" not in text
    assert "layer0           top-2 tokens=[" in text


def test_run_json_describes_the_routers(routed: tuple[gw.Run, list[list[np.ndarray]]]) -> None:
    run, _ = routed
    gates = {g["name"]: g for g in run.meta["gates"]}
    assert list(gates) == ["layer0", "layer1", "layer2"]
    for layer, (n_experts, k) in enumerate(LAYERS):
        g = gates[f"layer{layer}"]
        assert (g["task"], g["top_k"], g["experts"], g["output"]) == (None, k, n_experts, "logits")
        assert g["path"] == f"layers.{layer}.router" and g["module_class"] == "Router"
