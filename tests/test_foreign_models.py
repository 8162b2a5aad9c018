"""Models written the way other libraries write them, built here: gatewatch must find and read their gates.

* a PLE with ``gate_<task>`` / ``gate_shared`` attributes, specific-first or shared-first expert order,
  expert names per level, and a last-level shared gate that runs but feeds nothing, or never runs;
* an MMoE whose gates are ``Sequential(Linear, BatchNorm1d, Softmax)``;
* a model with ``Linear`` gates and a functional ``torch.softmax``, plus a router returning a tuple.

Gate statistics are checked against plain numpy on the gate outputs captured by separate hooks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gatewatch as gw
from gatewatch.report import build_report

TASKS = ["ctr", "cvr"]
D, N, STEPS, EVERY = 6, 32, 4, 2
ORDERS = ("specific_first", "shared_first")


def expert(d_in: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, D), nn.ReLU())


def softmax_gate(d_in: int, n_experts: int, *, batchnorm: bool = False) -> nn.Sequential:
    middle = [nn.BatchNorm1d(n_experts)] if batchnorm else []
    return nn.Sequential(nn.Linear(d_in, n_experts), *middle, nn.Softmax(dim=1))


def mix(weights: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
    return (weights.unsqueeze(-1) * torch.stack(outputs, 1)).sum(1)


class Level(nn.Module):
    """One extraction level, library style: ``specific_<task>``, ``shared``, ``gate_<task>``, ``gate_shared``.

    ``shared_gate``: "used" (feeds the next level), "unused" (runs, its output is thrown away - some
    libraries build the last level like the others), "skipped" (exists, never called).
    """

    def __init__(self, d_in: int, order: str, shared_gate: str, n_specific: int = 2, n_shared: int = 1) -> None:
        super().__init__()
        self.order, self.shared_gate = order, shared_gate
        self.shared = nn.ModuleList(expert(d_in) for _ in range(n_shared))
        for t in TASKS:
            self.add_module(f"specific_{t}", nn.ModuleList(expert(d_in) for _ in range(n_specific)))
            self.add_module(f"gate_{t}", softmax_gate(d_in, n_specific + n_shared))
        self.gate_shared = softmax_gate(d_in, len(TASKS) * n_specific + n_shared)

    def arrange(self, specific: list, shared: list) -> list:
        return specific + shared if self.order == "specific_first" else shared + specific

    def labels(self, level: int, task: str | None) -> list[str]:
        """Expert names in this level's gate-output order."""
        spec = {t: [f"l{level}.{t}-specific-{i}" for i in range(len(getattr(self, f"specific_{t}")))] for t in TASKS}
        shared = [f"l{level}.shared-{i}" for i in range(len(self.shared))]
        return self.arrange(spec[task] if task else [x for t in TASKS for x in spec[t]], shared)

    def forward(self, task_in: list[torch.Tensor], shared_in: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        shared = [e(shared_in) for e in self.shared]
        spec = {t: [e(h) for e in getattr(self, f"specific_{t}")] for t, h in zip(TASKS, task_in, strict=True)}
        outs = [mix(getattr(self, f"gate_{t}")(h), self.arrange(spec[t], shared)) for t, h in zip(TASKS, task_in,
                                                                                                   strict=True)]
        if self.shared_gate == "skipped":
            return outs, shared_in
        mixed = mix(self.gate_shared(shared_in), self.arrange([x for t in TASKS for x in spec[t]], shared))
        return outs, mixed if self.shared_gate == "used" else shared_in


class LibPLE(nn.Module):
    """Two levels; the last level's shared gate is ``last_shared_gate`` ("unused" or "skipped")."""

    def __init__(self, order: str = "specific_first", last_shared_gate: str = "unused") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.levels = nn.ModuleList([Level(D, order, "used"), Level(D, order, last_shared_gate)])
        self.towers = nn.ModuleDict({t: nn.Linear(D, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        task_in, shared_in = [x] * len(TASKS), x
        for level in self.levels:
            task_in, shared_in = level(task_in, shared_in)
        return [self.towers[t](h).squeeze(-1) for t, h in zip(TASKS, task_in, strict=True)]

    def named_gates(self) -> dict[str, gw.Gate]:
        """Every gate with its task, level and expert names."""
        gates = {}
        for i, level in enumerate(self.levels):
            for task in [*TASKS, None]:
                path = f"levels.{i}.gate_{task or 'shared'}.1"
                gates[f"{task or 'shared'}.l{i}"] = gw.Gate(path, task=task, level=i, experts=level.labels(i, task))
        return gates


def reorder_like(source: LibPLE, target: LibPLE) -> None:
    """Give ``target`` (the other expert order) the weights of ``source``, gate rows permuted to its order."""
    target.load_state_dict(source.state_dict())
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(source.levels, target.levels, strict=True)):
            for task in [*TASKS, None]:
                order = [a.labels(i, task).index(name) for name in b.labels(i, task)]
                linear = getattr(b, f"gate_{task or 'shared'}")[0]
                linear.weight.copy_(linear.weight[order])
                linear.bias.copy_(linear.bias[order])


# ---------------------------------------------------------------------------------------------- helpers
def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(N, D, generator=g)
    return x, (x[:, 0] > 0).float()


def capture(modules: dict[str, nn.Module], pick: Callable[[object], torch.Tensor] = lambda out: out) -> dict:
    """Record the training-mode outputs of ``modules`` (one array per forward) under their names."""
    seen: dict[str, list[np.ndarray]] = {name: [] for name in modules}
    for name, module in modules.items():
        def hook(m: nn.Module, _i: object, out: object, name: str = name) -> None:
            if m.training:
                seen[name].append(pick(out).detach().double().numpy())
        module.register_forward_hook(hook)
    return seen


def train(model: nn.Module, log_dir: Path, *, eval_every_step: bool = False, **watch_kwargs: object) -> gw.GateWatch:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    bce = nn.functional.binary_cross_entropy_with_logits
    with gw.GateWatch(model, tasks=TASKS, log_dir=log_dir, every=EVERY, flush_every=STEPS, **watch_kwargs) as watch:
        for step in range(STEPS):
            x, y = data(step)
            outs = model(x)
            watch.backward({"ctr": bce(outs[0], y), "cvr": bce(outs[1], 1 - y)})
            opt.step()
            opt.zero_grad()
            watch.step()
            if eval_every_step:
                model.eval()
                with torch.no_grad():
                    model(data(100 + step)[0])
                model.train()
    return watch


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def assert_gate_matches(run: gw.Run, gate: str, outputs: list[np.ndarray]) -> None:
    """The gate's rows in every window equal numpy statistics of its captured probabilities."""
    for end in range(EVERY, STEPS + 1, EVERY):
        p = np.concatenate(outputs[end - EVERY : end]).reshape(-1, outputs[0].shape[-1])
        row = run.gates[(run.gates["gate"] == gate) & (run.gates["step"] == end)].iloc[0]
        assert row["samples"] == len(p)
        h = -(p * np.log(np.maximum(p, 1e-300))).sum(1).mean() / np.log(p.shape[1])
        np.testing.assert_allclose(row["entropy"], h, rtol=1e-5)
        shares = run.shares[(run.shares["gate"] == gate) & (run.shares["step"] == end)].sort_values("expert")
        np.testing.assert_allclose(shares["share"].to_numpy(float), p.mean(0), rtol=1e-5, atol=1e-7)
        top1 = np.bincount(p.argmax(1), minlength=p.shape[1]) / len(p)
        np.testing.assert_allclose(shares["top1"].to_numpy(float), top1, atol=1e-12)


# ---------------------------------------------------------------------------------------------- PLE
def test_discovery_matches_library_style_ple_gates_to_tasks_and_levels(tmp_path: Path) -> None:
    watch = gw.GateWatch(LibPLE(), tasks=TASKS, log_dir=tmp_path, tensorboard=False)
    watch.close()
    found = {g.name: (g.task, g.level, g.path) for g in watch.gates}
    assert found == {
        f"{t or 'shared'}.l{i}": (t, i, f"levels.{i}.gate_{t or 'shared'}.1") for i in range(2) for t in [*TASKS, None]
    }


@pytest.fixture(scope="module")
def ple_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[gw.Run, dict, LibPLE]]:
    root = tmp_path_factory.mktemp("ple")
    first = LibPLE("specific_first")
    second = LibPLE("shared_first")
    reorder_like(first, second)
    runs = {}
    for order, model in zip(ORDERS, (first, second), strict=True):
        gates = model.named_gates()
        seen = capture({name: model.get_submodule(str(g.module)) for name, g in gates.items()})
        train(model, root / order, gates=gates)
        runs[order] = (gw.load_run(root / order), seen, model)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("order", ORDERS)
def test_expert_names_flow_into_run_json_and_tables(ple_runs: dict, order: str) -> None:
    run, seen, model = ple_runs[order]
    described = {g["name"]: g for g in run.meta["gates"]}
    for name, gate in model.named_gates().items():
        assert described[name]["expert_names"] == list(gate.experts)
        assert_gate_matches(run, name, seen[name])
        names = run.shares[run.shares["gate"] == name].sort_values(["step", "expert"])["expert_name"]
        assert names.tolist() == list(gate.experts) * (STEPS // EVERY)
    assert described["ctr.l0"]["expert_names"][0] == ("l0.ctr-specific-0" if order == "specific_first" else
                                                      "l0.shared-0")


@pytest.mark.parametrize("order", ORDERS)
def test_experts_table_averages_each_label_over_the_gates_that_mix_it(ple_runs: dict, order: str) -> None:
    run, seen, model = ple_runs[order]
    gates = model.named_gates()
    for end in range(EVERY, STEPS + 1, EVERY):
        shares: dict[str, list[float]] = {}
        refs: dict[str, list[float]] = {}
        for name, gate in gates.items():
            p = np.concatenate(seen[name][end - EVERY : end])
            for label, share in zip(gate.experts, p.mean(0), strict=True):
                shares.setdefault(label, []).append(share)
                refs.setdefault(label, []).append(1 / p.shape[1])
        got = run.experts[run.experts["step"] == end].set_index("expert")
        assert set(got.index) == set(shares)
        for label, values in shares.items():
            assert got.loc[label, "gates"] == len(values)
            np.testing.assert_allclose(got.loc[label, "utilization"], np.mean(values), rtol=1e-5)
            np.testing.assert_allclose(got.loc[label, "reference"], np.mean(refs[label]), rtol=1e-12)
    # a shared expert of level 0 is mixed by both task gates and the shared gate
    assert run.experts.set_index(["step", "expert"]).loc[(STEPS, "l0.shared-0"), "gates"] == 3


def test_both_expert_orders_give_the_same_statistics_per_expert_name(ple_runs: dict) -> None:
    a, b = (ple_runs[order][0] for order in ORDERS)
    for table, keys in (("shares", ["step", "gate", "expert_name"]), ("experts", ["step", "expert"])):
        left = a.table(table).sort_values(keys).reset_index(drop=True)
        right = b.table(table).sort_values(keys).reset_index(drop=True)
        assert left[keys].astype(str).equals(right[keys].astype(str))
        col = "share" if table == "shares" else "utilization"
        np.testing.assert_allclose(left[col].to_numpy(float), right[col].to_numpy(float), rtol=1e-4, atol=1e-6)


def test_unused_last_level_gate_is_watched_but_never_learns(ple_runs: dict) -> None:
    run, _, model = ple_runs["specific_first"]
    unused = model.levels[1].gate_shared[0]
    assert unused.weight.grad is None  # its output feeds nothing: no gradient reaches it
    assert set(run.gates[run.gates["gate"] == "shared.l1"]["samples"]) == {EVERY * N}


def test_last_level_gate_that_never_runs_has_no_rows_and_the_report_still_works(tmp_path: Path) -> None:
    model = LibPLE(last_shared_gate="skipped")
    train(model, tmp_path, gates=model.named_gates())
    run = gw.load_run(tmp_path)
    skipped = next(g for g in run.meta["gates"] if g["name"] == "shared.l1")
    assert skipped["experts"] is None
    assert "shared.l1" not in set(run.gates["gate"]) and len(set(run.gates["gate"])) == 5
    report = build_report(run)
    assert [g["name"] for g in report["gates"]] == ["ctr.l0", "cvr.l0", "shared.l0", "ctr.l1", "cvr.l1"]


# ---------------------------------------------------------------------------------------------- other gate forms
class BatchNormMMoE(nn.Module):
    """MMoE whose gates normalise their logits with BatchNorm1d before the softmax."""

    def __init__(self, n_experts: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.experts = nn.ModuleList(expert(D) for _ in range(n_experts))
        self.gates = nn.ModuleDict({t: softmax_gate(D, n_experts, batchnorm=True) for t in TASKS})
        self.towers = nn.ModuleDict({t: nn.Linear(D, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = [e(x) for e in self.experts]
        return [self.towers[t](mix(self.gates[t](x), f)).squeeze(-1) for t in TASKS]


def test_batchnorm_gates_are_discovered_and_eval_passes_are_left_out(tmp_path: Path) -> None:
    model = BatchNormMMoE()
    seen = capture({t: model.gates[t][2] for t in TASKS})
    watch = train(model, tmp_path, eval_every_step=True)
    assert [(g.name, g.path) for g in watch.gates] == [(t, f"gates.{t}.2") for t in TASKS]
    run = gw.load_run(tmp_path)
    for t in TASKS:
        assert len(seen[t]) == STEPS  # the eval passes were not captured by either hook
        assert_gate_matches(run, t, seen[t])


class Router(nn.Module):
    """A router module returning (logits, top-2 weights, top-2 indices)."""

    def __init__(self, n_experts: int) -> None:
        super().__init__()
        self.proj = nn.Linear(D, n_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.proj(x)
        weights, indices = logits.softmax(-1).topk(2, dim=-1)
        return logits, weights, indices


class FunctionalGates(nn.Module):
    """Task gates as bare Linear layers with ``torch.softmax`` in ``forward``, plus a shared top-2 router
    over the same experts."""

    def __init__(self, n_experts: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.router = Router(n_experts)
        self.experts = nn.ModuleList(expert(D) for _ in range(n_experts))
        self.gate_ctr, self.gate_cvr = nn.Linear(D, n_experts), nn.Linear(D, n_experts)
        self.towers = nn.ModuleDict({t: nn.Linear(D, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        _, weights, indices = self.router(x)
        f = [e(x) for e in self.experts]
        sparse = sum((weights * (indices == i)).sum(-1, keepdim=True) * out for i, out in enumerate(f))
        gates = {"ctr": torch.softmax(self.gate_ctr(x), dim=-1), "cvr": torch.softmax(self.gate_cvr(x), dim=-1)}
        return [self.towers[t](mix(gates[t], f) + sparse).squeeze(-1) for t in TASKS]


def test_functional_softmax_needs_explicit_gates_and_the_error_says_how(tmp_path: Path) -> None:
    with pytest.raises(gw.GateDiscoveryError) as info:
        gw.GateWatch(FunctionalGates(), tasks=TASKS, log_dir=tmp_path / "x", tensorboard=False)
    message = str(info.value)
    assert "'gate_ctr'" in message and "'router.proj'" in message and 'output="logits"' in message
    assert not (tmp_path / "x").exists()


def test_functional_softmax_and_a_router_tuple_over_the_same_named_experts(tmp_path: Path) -> None:
    model = FunctionalGates()
    names = [f"expert-{i}" for i in range(4)]
    gates = {
        "ctr": gw.Gate("gate_ctr", output="logits", experts=names),
        "cvr": gw.Gate("gate_cvr", output="logits", experts=names),
        "router": gw.Gate("router", output="logits", extract=lambda out: out[0], top_k=2, experts=names),
    }
    seen = capture({"ctr": model.gate_ctr, "cvr": model.gate_cvr})
    seen.update(capture({"router": model.router}, pick=lambda out: out[0]))
    watch = train(model, tmp_path, gates=gates)
    assert [(g.name, g.task) for g in watch.gates] == [("ctr", "ctr"), ("cvr", "cvr"), ("router", None)]
    run = gw.load_run(tmp_path)
    probs = {name: [softmax(logits) for logits in seen[name]] for name in gates}
    for name in gates:
        assert_gate_matches(run, name, probs[name])
    last = run.shares[run.shares["step"] == STEPS]
    router = last[last["gate"] == "router"]
    assert router["selected"].sum() == pytest.approx(2.0)  # each sample picks 2 of the 4 experts
    assert last[last["gate"] == "ctr"]["selected"].isna().all()  # dense gates select nothing
    # one expert name, three gates: utilization is the mean of the three gates' shares
    experts = run.experts[run.experts["step"] == STEPS].set_index("expert")
    assert list(experts.index) == names and (experts["gates"] == 3).all()
    want = np.mean([np.concatenate(probs[name][STEPS - EVERY :]).mean(0) for name in gates], axis=0)
    np.testing.assert_allclose(experts["utilization"].to_numpy(float), want, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- the guide
def guide_snippets() -> list[str]:
    """The ``python`` code blocks of docs/guide.md (blocks tagged ``python no-run`` are left out)."""
    text = (Path(__file__).parents[1] / "docs" / "guide.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.slow
def test_guide_snippets_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    snippets = guide_snippets()
    assert len(snippets) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "guide"}
    for code in snippets:
        exec(compile(code, "docs/guide.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "gate_ctr" in out and "('ctr', 'gates.ctr.2')" in out and "layer" in out
    assert gw.load_run(tmp_path / "runs" / "plain").status == "finished"
    assert gw.load_run(tmp_path / "runs" / "amp").steps == 10
    assert gw.build_report(gw.load_run(tmp_path / "runs" / "moe"))["unit"] == "layer"
