"""Reference models: outputs checked against hand-written mixtures, gate descriptions, rebuild."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from gatewatch.models import CGC, PLE, MMoE, OMoE, SharedBottom, build, factory_ref
from gatewatch.models.ple import PLELevel
from gatewatch.remedies import GateDropout, TemperatureSoftmax

TASKS = ["ctr", "like"]
SMALL = {"expert_hidden": [6], "expert_dim": 4, "tower_hidden": [3]}


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def gate_probs_np(gate: nn.Sequential, x: torch.Tensor) -> np.ndarray:
    """Softmax(W x + b) computed with numpy from a plain ``Sequential(Linear, Softmax)`` gate."""
    linear = gate[0]
    return np_softmax(x.numpy() @ linear.weight.detach().numpy().T + linear.bias.detach().numpy())


def mix_np(probs: np.ndarray, outputs: list[torch.Tensor]) -> torch.Tensor:
    mixed = sum(probs[:, [i]] * out.detach().numpy() for i, out in enumerate(outputs))
    return torch.from_numpy(mixed.astype(np.float32))


def towers(model: nn.Module, hidden: list[torch.Tensor]) -> list[np.ndarray]:
    return [model.towers[t](h).squeeze(-1).detach().numpy() for t, h in zip(model.tasks, hidden, strict=True)]


def assert_outputs(model: nn.Module, x: torch.Tensor, expected: list[np.ndarray]) -> None:
    outputs = model(x)
    assert len(outputs) == len(model.tasks)
    for out, exp in zip(outputs, expected, strict=True):
        assert out.shape == (x.shape[0],)
        np.testing.assert_allclose(out.detach().numpy(), exp, rtol=1e-4, atol=1e-5)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(9, 5, generator=torch.Generator().manual_seed(0))


def test_mmoe_is_per_task_softmax_mixture(x):
    torch.manual_seed(0)
    model = MMoE(in_dim=5, tasks=TASKS, n_experts=3, **SMALL)
    assert isinstance(model.gates, nn.ModuleDict) and list(model.gates) == TASKS
    assert isinstance(model.experts, nn.ModuleList) and len(model.experts) == 3
    experts = [e(x) for e in model.experts]
    hidden = [mix_np(gate_probs_np(model.gates[t], x), experts) for t in TASKS]
    assert_outputs(model, x, towers(model, hidden))


def test_omoe_shares_one_gate(x):
    torch.manual_seed(0)
    model = OMoE(in_dim=5, tasks=TASKS, n_experts=3, **SMALL)
    assert not hasattr(model, "gates")
    experts = [e(x) for e in model.experts]
    mixed = mix_np(gate_probs_np(model.gate, x), experts)
    assert_outputs(model, x, towers(model, [mixed, mixed]))


def test_shared_bottom_feeds_every_tower(x):
    torch.manual_seed(0)
    model = SharedBottom(in_dim=5, tasks=TASKS, bottom_hidden=[6], bottom_dim=4, tower_hidden=[])
    bottom = model.bottom(x)
    assert_outputs(model, x, towers(model, [bottom, bottom]))
    assert not any(isinstance(m, nn.Softmax) for m in model.modules())


def expert_by_label(level: PLELevel, label: str) -> nn.Module:
    owner, index = label.rsplit("-", 1)
    return level.shared[int(index)] if owner == "shared" else level.specific[owner][int(index)]


def ple_by_hand(model: PLE, x: torch.Tensor) -> list[np.ndarray]:
    """PLE forward from ``gatewatch_gates()``: every gate mixes the experts its labels name."""
    gates = model.gatewatch_gates()
    task_in = dict.fromkeys(model.tasks, x)
    shared_in = x
    for index, level in enumerate(model.levels):
        inputs = {**task_in, "shared": shared_in}
        named_gates = {t: level.gates[t] for t in model.tasks}
        if hasattr(level, "shared_gate"):
            named_gates["shared"] = level.shared_gate
        outputs = {}
        for name, gate in named_gates.items():
            labels = [lab.split(".", 1)[-1] for lab in gates[f"{name}.l{index}"]["experts"]]  # drop "l1."
            experts = [expert_by_label(level, lab)(inputs[lab.rsplit("-", 1)[0]]) for lab in labels]
            outputs[name] = mix_np(gate_probs_np(gate, inputs[name]), experts)
        task_in = {t: outputs[t] for t in model.tasks}
        shared_in = outputs.get("shared")
    return towers(model, [task_in[t] for t in model.tasks])


@pytest.mark.parametrize("order", ["specific_first", "shared_first"])
@pytest.mark.parametrize("n_levels", [1, 3])
def test_ple_matches_hand_mixture(x, order, n_levels):
    torch.manual_seed(0)
    model = PLE(
        in_dim=5, tasks=TASKS, n_levels=n_levels, n_specific=2, n_shared=2, expert_order=order, **SMALL
    )
    assert_outputs(model, x, ple_by_hand(model, x))


def test_ple_gate_descriptions_and_structure():
    model = PLE(in_dim=5, tasks=TASKS, n_levels=2, n_specific=2, n_shared=1, **SMALL)
    gates = model.gatewatch_gates()
    assert list(gates) == ["ctr.l0", "like.l0", "shared.l0", "ctr.l1", "like.l1"]
    assert gates["ctr.l0"]["experts"] == ["l0.ctr-0", "l0.ctr-1", "l0.shared-0"]
    assert gates["like.l1"]["experts"] == ["l1.like-0", "l1.like-1", "l1.shared-0"]
    assert gates["shared.l0"]["experts"] == ["l0.ctr-0", "l0.ctr-1", "l0.like-0", "l0.like-1", "l0.shared-0"]
    assert [(g["task"], g["level"]) for g in gates.values()] == [
        ("ctr", 0), ("like", 0), (None, 0), ("ctr", 1), ("like", 1),
    ]  # fmt: skip
    assert hasattr(model.levels[0], "shared_gate") and not hasattr(model.levels[1], "shared_gate")
    shared_first = PLE(in_dim=5, tasks=TASKS, n_levels=2, n_specific=2, expert_order="shared_first", **SMALL)
    described = shared_first.gatewatch_gates()
    assert described["ctr.l0"]["experts"] == ["l0.shared-0", "l0.ctr-0", "l0.ctr-1"]
    assert described["shared.l0"]["experts"] == ["l0.shared-0", "l0.ctr-0", "l0.ctr-1", "l0.like-0", "l0.like-1"]
    assert CGC(in_dim=5, tasks=TASKS, n_specific=1, **SMALL).gatewatch_gates()["ctr.l0"]["experts"] == [
        "ctr-0", "shared-0"
    ]


def test_cgc_is_one_level_without_shared_gate(x):
    torch.manual_seed(0)
    model = CGC(in_dim=5, tasks=TASKS, n_specific=1, n_shared=2, **SMALL)
    assert len(model.levels) == 1 and not hasattr(model.levels[0], "shared_gate")
    assert list(model.gatewatch_gates()) == ["ctr.l0", "like.l0"]
    assert_outputs(model, x, ple_by_hand(model, x))


def all_gate_models() -> list[nn.Module]:
    return [
        MMoE(in_dim=5, tasks=TASKS, n_experts=3, **SMALL),
        OMoE(in_dim=5, tasks=TASKS, n_experts=3, **SMALL),
        PLE(in_dim=5, tasks=TASKS, n_levels=2, **SMALL),
        CGC(in_dim=5, tasks=TASKS, **SMALL),
    ]


@pytest.mark.parametrize("model", all_gate_models(), ids=lambda m: type(m).__name__)
def test_gatewatch_gates_cover_every_softmax_and_see_its_output(model, x):
    gates = model.gatewatch_gates()
    softmaxes = [m for m in model.modules() if isinstance(m, nn.Softmax)]
    assert [id(m) for m in softmaxes] == [id(g["module"]) for g in gates.values()]
    seen = {}
    handles = [
        g["module"].register_forward_hook(lambda _m, _i, out, name=name: seen.setdefault(name, out))
        for name, g in gates.items()
    ]
    model(x)
    for handle in handles:
        handle.remove()
    for name, g in gates.items():
        assert seen[name].shape == (x.shape[0], len(g["experts"]))
        np.testing.assert_allclose(seen[name].sum(-1).detach().numpy(), 1.0, atol=1e-6)


def test_mmoe_and_omoe_gate_names():
    mmoe, omoe = all_gate_models()[:2]
    assert {k: (g["task"], g["level"], g["experts"]) for k, g in mmoe.gatewatch_gates().items()} == {
        t: (t, 0, ["0", "1", "2"]) for t in TASKS
    }
    assert {k: (g["task"], g["experts"]) for k, g in omoe.gatewatch_gates().items()} == {
        "shared": (None, ["0", "1", "2"])
    }


@pytest.mark.parametrize("cls", [MMoE, OMoE, PLE, CGC])
def test_gate_remedy_options_are_wired(cls):
    torch.manual_seed(0)
    model = cls(
        in_dim=200, tasks=TASKS, gate_temperature=0.5, gate_layernorm=True, gate_dropout=0.1,
        gate_init_std=1e-3, **SMALL,
    )  # fmt: skip
    for gate in model.gatewatch_gates().values():
        softmax = gate["module"]
        assert isinstance(softmax, TemperatureSoftmax) and softmax.temperature == 0.5
    sequences = [
        m for m in model.modules() if isinstance(m, nn.Sequential) and isinstance(m[-1], GateDropout)
    ]
    assert len(sequences) == len(model.gatewatch_gates())
    for gate in sequences:
        assert [type(m) for m in gate] == [nn.Linear, nn.LayerNorm, TemperatureSoftmax, GateDropout]
        assert gate[0].weight.detach().std().item() == pytest.approx(1e-3, rel=0.2)
        assert gate[3].p == 0.1


@pytest.mark.parametrize("model", [*all_gate_models(), SharedBottom(in_dim=5, tasks=TASKS)],
                         ids=lambda m: type(m).__name__)  # fmt: skip
def test_every_parameter_gets_a_gradient(model, x):
    sum(out.sum() for out in model(x)).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []


@pytest.mark.parametrize("model", [*all_gate_models(), SharedBottom(in_dim=5, tasks=("a", "b", "c"))],
                         ids=lambda m: type(m).__name__)  # fmt: skip
def test_factory_ref_round_trips_through_json(model, x):
    ref = json.loads(json.dumps(factory_ref(model)))
    assert ref["factory"] == f"{type(model).__module__}:{type(model).__name__}"
    assert ref["kwargs"] == model.config
    rebuilt = build(ref)
    assert type(rebuilt) is type(model)
    rebuilt.load_state_dict(model.state_dict())
    for a, b in zip(model(x), rebuilt(x), strict=True):
        assert torch.equal(a, b)


def test_config_records_constructor_kwargs_only():
    cgc = CGC(in_dim=5, tasks=("a", "b"), n_shared=3)
    assert "n_levels" not in cgc.config
    assert cgc.config["tasks"] == ["a", "b"] and cgc.config["n_shared"] == 3
    assert MMoE(in_dim=5, tasks=TASKS, expert_hidden=(7, 6)).config["expert_hidden"] == [7, 6]
    assert (
        factory_ref(build({"factory": "gatewatch.models:OMoE", "kwargs": {"in_dim": 3, "tasks": ["t"]}}))[
            "factory"
        ]
        == "gatewatch.models.mmoe:OMoE"
    )


@pytest.mark.parametrize(
    "ref",
    [
        ["gatewatch.models.mmoe:MMoE"],
        "gatewatch.models.mmoe:MMoE",
        {"kwargs": {}},
        {"factory": "gatewatch.models.mmoe.MMoE"},
        {"factory": "gatewatch.models.mmoe:MMoE:x"},
        {"factory": ":MMoE"},
        {"factory": "gatewatch.models.mmoe:MMoE", "kwargs": [5]},
        {"factory": "gatewatch.no_such_module:MMoE"},
        {"factory": "gatewatch.models.mmoe:NoSuchModel"},
        {"factory": "gatewatch.models.ple:EXPERT_ORDERS"},
    ],
)
def test_build_rejects_bad_refs(ref):
    with pytest.raises(ValueError):
        build(ref)


def test_factory_ref_needs_a_config():
    with pytest.raises(ValueError, match="config"):
        factory_ref(nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (MMoE, {"tasks": []}),
        (MMoE, {"tasks": ["a", "a"]}),
        (MMoE, {"tasks": ["a.b"]}),
        (MMoE, {"tasks": "ab"}),
        (MMoE, {"tasks": TASKS, "n_experts": 0}),
        (OMoE, {"tasks": TASKS, "expert_hidden": [4, 0]}),
        (SharedBottom, {"tasks": TASKS, "bottom_dim": 0}),
        (PLE, {"tasks": ["shared", "b"]}),
        (PLE, {"tasks": TASKS, "expert_order": "random"}),
        (PLE, {"tasks": TASKS, "n_levels": 0}),
        (CGC, {"tasks": TASKS, "n_specific": 0}),
        (MMoE, {"tasks": TASKS, "gate_temperature": -1.0}),
        (MMoE, {"tasks": TASKS, "gate_dropout": 1.0}),
    ],
)
def test_constructors_validate_arguments(cls, kwargs):
    with pytest.raises(ValueError):
        cls(in_dim=5, **kwargs)
