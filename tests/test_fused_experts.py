"""Fused experts (every expert of a layer held as a slice of ``[E, ...]`` parameters): found with no configuration
on transformers 5 MoE models (Qwen3-MoE, Mixtral, OLMoE, GPT-OSS's transposed layout with biases), on a
torchtitan-style grouped-experts model and on a batched-einsum MMoE, or declared with ``gw.FusedExperts``.

Per-expert gradient conflict is checked against ``torch.autograd.grad`` of each task's loss on the fused
parameters of a twin, sliced per expert (numpy cosines, 1e-5); training is unchanged by the watch."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _grouped_experts import GroupedMoE
from _grouped_experts import losses as grouped_losses
from torch import nn

import gatewatch as gw
from gatewatch.gating.expert_map import find_experts
from gatewatch.gating.fused_experts import FusedExpertsError
from gatewatch.report import build_report, render_text
from gatewatch.rules import Thresholds

TASKS = ["a", "b"]
LossFn = Callable[[nn.Module, int], dict[str, torch.Tensor]]


# ---------------------------------------------------------------------------------------------- models
class TwoHeads(nn.Module):
    """A tiny transformers 5 MoE backbone (``_hf_moe``) with two regression heads on its last hidden state."""

    def __init__(self, family: str) -> None:
        super().__init__()
        from _hf_moe import build

        self.tasks = list(TASKS)
        self.backbone = build(family).model
        self.backbone.config.use_cache = False
        size = self.backbone.config.hidden_size
        self.heads = nn.ModuleDict({t: nn.Linear(size, 1) for t in TASKS})

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(input_ids=ids).last_hidden_state
        return {t: head(h).squeeze(-1) for t, head in self.heads.items()}


def hf_losses(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    out = model(ids)
    target = (ids.float() / 64).sin()
    return {"a": F.mse_loss(out["a"], target), "b": F.mse_loss(out["b"], -target * 2 + 0.5)}


class EinsumExperts(nn.Module):
    """E linear experts run as one batched einsum: ``weight`` ``[E, D, H]`` (or ``[D, E, H]`` when ``dim_first``)."""

    def __init__(self, n: int, d: int, h: int, dim_first: bool = False) -> None:
        super().__init__()
        self.dim_first = dim_first
        self.weight = nn.Parameter(torch.randn(d, n, h) / d**0.5 if dim_first else torch.randn(n, d, h) / d**0.5)
        self.bias = nn.Parameter(torch.randn(n, h) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B, E, H]
        w = self.weight.transpose(0, 1) if self.dim_first else self.weight
        return torch.relu(torch.einsum("bd,edh->beh", x, w) + self.bias)


class EinsumMMoE(nn.Module):
    """An MMoE whose experts are one :class:`EinsumExperts`; one softmax gate and one tower per task."""

    def __init__(self, n: int = 3, d: int = 6, h: int = 5, dim_first: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tasks = list(TASKS)
        self.experts = EinsumExperts(n, d, h, dim_first)
        self.gates = nn.ModuleDict({t: nn.Sequential(nn.Linear(d, n), nn.Softmax(-1)) for t in TASKS})
        self.towers = nn.ModuleDict({t: nn.Linear(h, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        e = self.experts(x)
        return {t: self.towers[t]((self.gates[t](x).unsqueeze(-1) * e).sum(1)).squeeze(-1) for t in TASKS}


def mmoe_losses(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 6, generator=g)
    out = model(x)
    return {"a": F.mse_loss(out["a"], x[:, 0]), "b": F.mse_loss(out["b"], -x[:, 0] + x[:, 1])}


# ---------------------------------------------------------------------------------------------- reference
def train(model: nn.Module, losses: LossFn, tmp_path: Path | None, steps: int, **kwargs: Any
          ) -> tuple[nn.Module, list[tuple[int, dict[str, dict[str, torch.Tensor]]]]]:
    """Train ``steps`` SGD steps, watched with conflict on every step when ``tmp_path`` is given; on a twin,
    each step's ``torch.autograd.grad`` of each task's loss on every parameter."""
    watch = None if tmp_path is None else gw.GateWatch(
        model, tasks=TASKS, log_dir=tmp_path / "run", tensorboard=False, conflict_every=1, every=1, **kwargs)
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    reference = []
    for step in range(1, steps + 1):
        if watch is not None:
            twin.load_state_dict(model.state_dict())
            named = list(twin.named_parameters())
            task_losses = losses(twin, step)
            reference.append((step, {t: {n: (g if g is not None else torch.zeros_like(p)).detach().double()
                                         for (n, p), g in zip(named, torch.autograd.grad(
                                             task_losses[t], [p for _, p in named], retain_graph=True,
                                             allow_unused=True), strict=True)}
                                     for t in TASKS}))
            watch.backward(losses(model, step))
        else:
            sum(losses(model, step).values()).backward()
        opt.step()
        opt.zero_grad()
        if watch is not None:
            watch.step()
    if watch is not None:
        watch.close()
    return model, reference


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    x, y = a.reshape(-1).numpy(), b.reshape(-1).numpy()
    na, nb = np.linalg.norm(x), np.linalg.norm(y)
    return 0.0 if na == 0 or nb == 0 else float(x @ y / (na * nb))


def check_fused_conflict(make: Callable[[], nn.Module], losses: LossFn, tmp_path: Path, fused: dict[str, int],
                         module: str, steps: int = 3, **kwargs: Any) -> gw.Run:
    """Every logged slice and expert cosine against the twin's autograd.grad sliced per expert; the report's
    ``expert_conflict`` at the last step likewise; the trained parameters equal those of an unwatched run."""
    watched, reference = train(make(), losses, tmp_path, steps, **kwargs)
    plain, _ = train(make(), losses, None, steps)
    for (name, a), b in zip(plain.named_parameters(), watched.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # the watch changes no trained parameter
    run = gw.load_run(tmp_path / "run")
    table = run.table("conflict")
    described = [g for g in run.meta["gates"] if (g.get("fused_experts") or {}).get("module") == module]
    assert described and described[0]["fused_experts"]["params"] == fused
    n = described[0]["fused_experts"]["experts"]
    checked = 0
    for step, grads in reference:
        rows = table[(table["step"] == step) & (table["task_a"] == "a") & (table["task_b"] == "b")]
        got = dict(zip(rows["scope"] + ":" + rows["name"], rows["cosine"], strict=True))
        for e in range(n):
            parts = {t: [grads[t][name].select(d, e) for name, d in fused.items()] for t in TASKS}
            for (name, _), ga, gb in zip(fused.items(), parts["a"], parts["b"], strict=True):
                assert got[f"param:{name}[{e}]"] == pytest.approx(cosine(ga, gb), abs=1e-5)
            expert = cosine(torch.cat([p.reshape(-1) for p in parts["a"]]),
                            torch.cat([p.reshape(-1) for p in parts["b"]]))
            assert got[f"module:{module}[{e}]"] == pytest.approx(expert, abs=1e-5)
            checked += 1
    entries = {e["module"]: e for e in build_report(run)["expert_conflict"] if e["module"].startswith(module + "[")}
    assert sorted(entries) == sorted(f"{module}[{e}]" for e in range(n))
    last = reference[-1][1]
    for e in range(n):
        want = cosine(torch.cat([last["a"][name].select(d, e).reshape(-1) for name, d in fused.items()]),
                      torch.cat([last["b"][name].select(d, e).reshape(-1) for name, d in fused.items()]))
        entry = entries[f"{module}[{e}]"]
        assert entry["cosine"] == pytest.approx(want, abs=1e-5) and entry["step"] == steps
    assert checked == n * steps
    return run


# ---------------------------------------------------------------------------------------------- the checks
HF = {"qwen3_moe": ("gate_up_proj", "down_proj"), "mixtral": ("gate_up_proj", "down_proj"),
      "olmoe": ("gate_up_proj", "down_proj"),
      "gpt_oss": ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")}  # transposed, biases


@pytest.mark.parametrize("family", list(HF))
@pytest.mark.slow
def test_transformers_fused_experts_match_autograd_per_expert(family: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    module = "backbone.layers.1.mlp.experts"
    fused = {f"{module}.{p}": 0 for p in HF[family]}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # every layer's experts are found: nothing is skipped
        run = check_fused_conflict(lambda: TwoHeads(family), hf_losses, tmp_path, fused, module)
    report = build_report(run)
    assert not [s for s in report["skipped"] if s["view"] != "similarity"]
    layers = {e["module"].rsplit("[", 1)[0] for e in report["expert_conflict"]}
    assert layers == {"backbone.layers.0.mlp.experts", "backbone.layers.1.mlp.experts"}
    entry = report["expert_conflict"][0]
    assert entry["share_source"] == "shared router (same for every task)"
    assert entry["share"]["a"] == entry["share"]["b"] and entry["experts"] == 8
    if family == "gpt_oss":  # a transposed layout: gate_up_proj [E, H, 2I]
        assert run.meta["conflict"]["fused"][f"{module}.gate_up_proj"] == 0


def test_grouped_experts_found_with_no_configuration(tmp_path: Path) -> None:
    module = "layers.0.experts"
    fused = {f"{module}.w{i}": 0 for i in (1, 2, 3)}
    run = check_fused_conflict(GroupedMoE, grouped_losses, tmp_path, fused, module, steps=4)
    assert run.meta["conflict"]["slices"] == 2 * 3 * 4  # two layers of three parameters cut into four experts


def test_batched_einsum_mmoe_found_with_no_configuration(tmp_path: Path) -> None:
    run = check_fused_conflict(EinsumMMoE, mmoe_losses, tmp_path, {"experts.weight": 0, "experts.bias": 0},
                               "experts")
    entries = build_report(run)["expert_conflict"]
    assert {e["share_source"] for e in entries} == {"task gate"}
    assert entries[0]["share"]["a"] != entries[0]["share"]["b"]


@pytest.mark.slow
def test_declared_fused_experts_with_expert_dimension_not_first(tmp_path: Path) -> None:
    model = EinsumMMoE(dim_first=True)
    assert find_experts(model, "gates.a.1", 3)[1] is None  # [D, E, H]: not guessed
    declared = gw.FusedExperts("experts", dim={"weight": 1, "bias": 0})
    gates = {t: gw.Gate(f"gates.{t}.1", task=t, expert_modules=declared) for t in TASKS}
    run = check_fused_conflict(lambda: EinsumMMoE(dim_first=True), mmoe_losses, tmp_path,
                               {"experts.weight": 1, "experts.bias": 0}, "experts", gates=gates)
    assert run.meta["gates"][0]["expert_map"].startswith("explicit: fused experts experts")


def test_uneven_slices_under_a_custom_group(tmp_path: Path) -> None:
    """conflict_group puts expert 0 apart from the others: its slices are not evenly spaced any more."""
    def group(name: str) -> str:
        return "first" if name.endswith("[0]") else name.split("[")[0].rsplit(".", 1)[0]

    _, reference = train(GroupedMoE(), grouped_losses, tmp_path, 2, conflict_group=group)
    table = gw.load_run(tmp_path / "run").table("conflict")
    step, grads = reference[-1]
    rows = table[(table["step"] == step) & (table["scope"] == "param")].set_index("name")["cosine"]
    for e in range(4):
        name = "layers.1.experts.w2"
        assert rows[f"{name}[{e}]"] == pytest.approx(cosine(grads["a"][name][e], grads["b"][name][e]), abs=1e-5)


def test_bad_declarations_say_what_to_pass(tmp_path: Path) -> None:
    model = EinsumMMoE()
    with pytest.raises(TypeError, match=r"expert_modules=gw\.FusedExperts"):
        gw.Gate("gates.a.1", experts=gw.FusedExperts("experts"))
    for spec, match in [(gw.FusedExperts("nowhere"), "no module at 'nowhere'"),
                        (gw.FusedExperts("experts", dim={"w": 0}), r"names \['w'\]"),
                        (gw.FusedExperts("experts", dim=1), "different expert counts"),
                        (gw.FusedExperts("experts", dim=3), r"does not fit weight of shape \(3, 6, 5\)")]:
        with pytest.raises(FusedExpertsError, match=match):
            gw.GateWatch(model, tasks=TASKS, log_dir=tmp_path / "bad", tensorboard=False,
                         gates={t: gw.Gate(f"gates.{t}.1", task=t, expert_modules=spec) for t in TASKS})
    wrong = EinsumMMoE(n=3)
    gates = {t: gw.Gate(f"gates.{t}.1", task=t, expert_modules=gw.FusedExperts("experts", dim=-1))
             for t in TASKS}
    with pytest.raises(FusedExpertsError, match="has 3 outputs but its FusedExperts"), gw.GateWatch(
            wrong, tasks=TASKS, log_dir=tmp_path / "width", tensorboard=False, gates=gates) as watch:
        watch.backward(mmoe_losses(wrong, 1))


# ---------------------------------------------------------------------------------------------- skipped views
class NoExperts(nn.Module):
    """Two task gates over a computation gatewatch cannot map to experts (one plain Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks = list(TASKS)
        self.body = nn.Linear(6, 12)
        self.gates = nn.ModuleDict({t: nn.Sequential(nn.Linear(6, 3), nn.Softmax(-1)) for t in TASKS})
        self.towers = nn.ModuleDict({t: nn.Linear(4, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        e = self.body(x).view(-1, 3, 4)
        return {t: self.towers[t]((self.gates[t](x).unsqueeze(-1) * e).sum(1)).squeeze(-1) for t in TASKS}


def test_unmapped_experts_are_skipped_with_the_reason_and_warned_once(tmp_path: Path) -> None:
    model = NoExperts()
    with pytest.warns(RuntimeWarning, match=r"expert_conflict will be skipped for 2 gate\(s\)") as caught:
        train(model, mmoe_losses, tmp_path, 2)
    assert sum("will be skipped" in str(w.message) for w in caught) == 1
    report = build_report(gw.load_run(tmp_path / "run"))
    assert report["expert_conflict"] == []
    skipped = {(s["view"], s["gate"]): s for s in report["skipped"]}
    assert set(skipped) == {(view, t) for view in ("expert_conflict", "similarity") for t in TASKS}
    assert "experts of 'gates.a.1' not found" in skipped[("expert_conflict", "a")]["reason"]
    assert "gw.Gate(..., expert_modules=" in skipped[("expert_conflict", "a")]["fix"]
    text = render_text(report)
    assert "skipped (4):" in text and "expert_conflict of gate 'a': experts of 'gates.a.1' not found" in text


@pytest.mark.slow
def test_contested_expert_on_routers_is_relative_to_an_even_share(tmp_path: Path) -> None:
    train(GroupedMoE(), grouped_losses, tmp_path, 6)
    run = gw.load_run(tmp_path / "run")
    loose = build_report(run, Thresholds(contested_below=0.0, contested_even=0.0))
    flagged = [f for f in loose["findings"] if f["code"] == "contested_expert"]
    assert len(flagged) == len(loose["expert_conflict"]) == 2 * 4
    assert "router" in flagged[0]["remedy"] and "same for every task" in flagged[0]["message"]
    entry = loose["expert_conflict"][0]
    assert entry["experts"] == 4 and entry["share_source"] == "shared router (same for every task)"
    # at the default (1/E-relative) threshold an expert fires only when its share reaches contested_even / E
    even = Thresholds().contested_even / 4
    fired = {f["expert"] for f in build_report(run, Thresholds(contested_below=0.0))["findings"]
             if f["code"] == "contested_expert"}
    assert fired == {e["expert"] for e in loose["expert_conflict"] if min(e["share"].values()) >= even}
    assert build_report(run, Thresholds(contested_below=0.0, contested_share=1.01))["findings"] == [
        f for f in build_report(run, Thresholds(contested_below=0.0, contested_share=1.01))["findings"]
        if f["code"] != "contested_expert"]
