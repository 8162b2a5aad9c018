"""Gate discovery, matching gates to tasks, output adapters and the errors that say what to pass."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_mmoe
from torch import nn

import gatewatch as gw
from gatewatch.gating.discovery import resolve
from gatewatch.gating.specs import GateOutputError, ResolvedGate


def gate_table(gates: list[ResolvedGate]) -> list[tuple[str, str | None, int, str]]:
    return [(g.name, g.task, g.level, g.path) for g in gates]


class BatchNormGates(nn.Module):
    """Gates as ``Sequential(Linear, BatchNorm1d, Softmax)`` in a ModuleList (names say nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_nets = nn.ModuleList(nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3), nn.Softmax(-1)) for _ in "ab")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [g(x) for g in self.gate_nets]


class FunctionalSoftmax(nn.Module):
    """Gate logits from Linear layers; softmax called functionally in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_ctr = nn.Linear(6, 4)
        self.gate_like = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.softmax(self.gate_ctr(x), -1), torch.softmax(self.gate_like(x), -1)]


class Router(nn.Module):
    """A sparse-MoE router returning (logits, top-k weights, top-k indices)."""

    def __init__(self, d: int, e: int, k: int) -> None:
        super().__init__()
        self.proj, self.k = nn.Linear(d, e), k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.proj(x)
        w, idx = torch.softmax(logits, -1).topk(self.k, -1)
        return logits, w / w.sum(-1, keepdim=True), idx


class TwoLayerRouters(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Router(6, 8, 2) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + 0 * layer(x)[1].sum(-1, keepdim=True)
        return x


class PLELike(nn.Module):
    """Two levels: per level a gate per task and a shared gate; names follow ``levels.<i>.<task>``."""

    def __init__(self) -> None:
        super().__init__()
        self.levels = nn.ModuleList(
            nn.ModuleDict({t: nn.Sequential(nn.Linear(6, 3), nn.Softmax(-1)) for t in ("ctr", "like", "shared")})
            for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [g(x) for level in self.levels for g in level.values()]


# ---------------------------------------------------------------- discovery
def test_softmax_modules_one_per_task() -> None:
    gates = resolve(tiny_mmoe(), ["ctr", "like"], None)
    assert gate_table(gates) == [("ctr", "ctr", 0, "gates.ctr.2"), ("like", "like", 0, "gates.like.2")]


def test_softmax_matched_by_name_not_by_declaration_order() -> None:
    """A ModuleDict declared in another order than tasks= still gives each task its own gate."""
    model = tiny_mmoe(tasks=("like", "ctr"))
    gates = resolve(model, ["ctr", "like"], None)
    assert [(g.task, g.path) for g in gates] == [("like", "gates.like.2"), ("ctr", "gates.ctr.2")]


def test_sequential_with_batchnorm_matched_by_position() -> None:
    gates = resolve(BatchNormGates(), ["ctr", "like"], None)
    assert gate_table(gates) == [("ctr", "ctr", 0, "gate_nets.0.2"), ("like", "like", 0, "gate_nets.1.2")]


def test_multi_level_model_gets_levels_and_shared_gates() -> None:
    gates = resolve(PLELike(), ["ctr", "like"], None)
    assert gate_table(gates) == [
        ("ctr.l0", "ctr", 0, "levels.0.ctr.1"), ("like.l0", "like", 0, "levels.0.like.1"),
        ("shared.l0", None, 0, "levels.0.shared.1"), ("ctr.l1", "ctr", 1, "levels.1.ctr.1"),
        ("like.l1", "like", 1, "levels.1.like.1"), ("shared.l1", None, 1, "levels.1.shared.1"),
    ]


def test_no_tasks_every_softmax_is_a_task_less_gate() -> None:
    gates = resolve(BatchNormGates(), None, None)
    assert gate_table(gates) == [("shared.l0", None, 0, "gate_nets.0.2"), ("shared.l1", None, 1, "gate_nets.1.2")]


def test_model_own_gatewatch_gates_method() -> None:
    class Own(PLELike):
        def gatewatch_gates(self) -> dict[str, dict[str, object]]:
            return {"top": {"module": self.levels[1]["ctr"][1], "task": "ctr", "level": 1, "experts": ["a", "b", "c"]},
                    "base": {"module": self.levels[0]["shared"][1], "level": 0}}

    gates = resolve(Own(), ["ctr", "like"], None)
    assert gate_table(gates) == [("top", "ctr", 1, "levels.1.ctr.1"), ("base", None, 0, "levels.0.shared.1")]
    assert gates[0].experts == ["a", "b", "c"]


def test_discovery_error_lists_candidates_with_sizes_and_the_argument_to_pass() -> None:
    with pytest.raises(gw.GateDiscoveryError) as err:
        resolve(BatchNormGates(), ["ctr", "like", "cvr"], None)
    msg = str(err.value)
    assert "'gate_nets.0.2'  E=3" in msg and "'gate_nets.1.2'  E=3" in msg
    assert 'gates={"ctr": gw.Gate("gate_nets.0.2", task="ctr"), "like": gw.Gate("gate_nets.1.2", task="like")}' in msg


def test_functional_softmax_error_suggests_logits_gates() -> None:
    with pytest.raises(gw.GateDiscoveryError) as err:
        resolve(FunctionalSoftmax(), ["ctr", "like"], None)
    msg = str(err.value)
    assert "no nn.Softmax module" in msg and "'gate_ctr'  E=4" in msg
    assert 'gw.Gate("gate_ctr", output="logits", task="ctr")' in msg


def test_no_gate_at_all_suggests_a_router_spec() -> None:
    with pytest.raises(gw.GateDiscoveryError, match="extract=lambda out: out"):
        resolve(nn.Sequential(nn.Linear(3, 3)), None, None)


# ---------------------------------------------------------------- explicit specs
def test_functional_softmax_with_logits_spec_reads_probabilities(tmp_path) -> None:
    model = FunctionalSoftmax()
    spec = {"ctr": gw.Gate("gate_ctr", output="logits"), "like": gw.Gate(model.gate_like, output="logits")}
    watch = gw.GateWatch(model, tasks=["ctr", "like"], gates=spec, log_dir=tmp_path, tensorboard=False)
    x = torch.randn(32, 6)
    expected = model(x)
    watch.step()
    watch.close()
    run = gw.load_run(tmp_path)
    for task, probs in zip(["ctr", "like"], expected, strict=True):
        share = run.shares[run.shares["gate"] == task].sort_values("expert")["share"].to_numpy()
        torch.testing.assert_close(torch.tensor(share), probs.detach().double().mean(0))
    assert run.gates.set_index("gate").loc["ctr", "task"] == "ctr"


def test_router_tuple_with_extract_and_top_k(tmp_path) -> None:
    model = TwoLayerRouters()
    spec = [gw.Gate(f"layers.{i}", output="logits", extract=lambda out: out[0], top_k=2) for i in range(2)]
    watch = gw.GateWatch(model, gates=spec, log_dir=tmp_path, tensorboard=False)
    x = torch.randn(3, 10, 6)  # [batch, tokens, dim]: tokens are flattened into samples
    model(x)
    watch.step()
    watch.close()
    run = gw.load_run(tmp_path)
    assert run.gate_names == ["layers.0", "layers.1"]
    g = run.gates.set_index("gate")
    assert g.loc["layers.0", "samples"] == 30 and g["task"].isna().all() and g["small_margin"].notna().all()
    sel = run.shares.groupby("gate")["selected"].sum()
    assert sel.tolist() == pytest.approx([2.0, 2.0])  # each token picks 2 experts
    assert sorted(run.experts["expert"])[:2] == ["layers.0:0", "layers.0:1"]  # layers own their experts


def test_gate_with_no_task_is_allowed_next_to_task_gates() -> None:
    model = PLELike()
    gates = resolve(model, ["ctr", "like"], {"ctr": "levels.0.ctr.1", "like": "levels.0.like.1",
                                             "mix": gw.Gate("levels.0.shared.1", level=0)})
    assert gate_table(gates) == [("ctr", "ctr", 0, "levels.0.ctr.1"), ("like", "like", 0, "levels.0.like.1"),
                                 ("mix", None, 0, "levels.0.shared.1")]


def test_explicit_list_numbers_levels_per_task() -> None:
    model = PLELike()
    gates = resolve(model, ["ctr", "like"], [gw.Gate(f"levels.{i}.ctr.1", task="ctr") for i in range(2)])
    assert gate_table(gates) == [("ctr.l0", "ctr", 0, "levels.0.ctr.1"), ("ctr.l1", "ctr", 1, "levels.1.ctr.1")]


@pytest.mark.parametrize(
    ("gates", "error", "match"),
    [
        ({"ctr": "gates.nope"}, gw.GateDiscoveryError, "No module at path 'gates.nope'"),
        ({"ctr": nn.Softmax(-1)}, gw.GateDiscoveryError, "not part of the model"),
        ({"x": gw.Gate("gates.ctr.2", task="cvr")}, gw.GateDiscoveryError, "task 'cvr', which is not in tasks"),
        ({}, gw.GateDiscoveryError, "gates= is empty"),
        ([3], TypeError, "A gate spec must be"),
    ],
)
def test_bad_specs_name_the_problem(gates: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        resolve(tiny_mmoe(), ["ctr", "like"], gates)


def test_gate_spec_validation() -> None:
    with pytest.raises(ValueError, match="'probs' or 'logits'"):
        gw.Gate("g", output="softmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k"):
        gw.Gate("g", top_k=0)


# ---------------------------------------------------------------- outputs
def test_to_probs_adapters() -> None:
    gate = ResolvedGate(name="g", module=nn.Identity(), path="g", output="logits", extract=lambda o: o["z"])
    z = torch.randn(2, 5, 3, dtype=torch.float16)
    p = gate.to_probs({"z": z})
    assert p.shape == (10, 3) and p.dtype == torch.float32
    torch.testing.assert_close(p, torch.softmax(z.float().reshape(10, 3), -1))
    with pytest.raises(GateOutputError, match="not a tensor"):
        ResolvedGate(name="g", module=nn.Identity(), path="g").to_probs((z,))
    with pytest.raises(GateOutputError, match=r"shape \(3,\)"):
        ResolvedGate(name="g", module=nn.Identity(), path="g").to_probs(torch.ones(3))


def test_logits_mistaken_for_probabilities_is_reported(tmp_path) -> None:
    model = FunctionalSoftmax()
    watch = gw.GateWatch(model, tasks=["ctr", "like"], gates={"ctr": "gate_ctr", "like": "gate_like"},
                         log_dir=tmp_path, tensorboard=False)
    with pytest.raises(GateOutputError, match=re.escape('gw.Gate("gate_ctr", output="logits")')):
        model(torch.randn(8, 6))
    watch.close()


def test_expert_names_must_match_outputs(tmp_path) -> None:
    model = tiny_mmoe()
    watch = gw.GateWatch(model, tasks=["ctr", "like"], log_dir=tmp_path, tensorboard=False,
                         gates={"ctr": gw.Gate("gates.ctr.2", experts=["a", "b"]), "like": "gates.like.2"})
    with pytest.raises(GateOutputError, match="4 outputs but 2 expert names"):
        model(torch.randn(8, 12))
    watch.close()
