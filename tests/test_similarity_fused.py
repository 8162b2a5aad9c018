"""Expert similarity on fused experts: every expert's output on common probe rows, from the fused module with the
routing forced, checked against a numpy CKA of each expert's own output computed with plain torch from the fused
weights (transformers Qwen3-MoE and GPT-OSS, a torchtitan-style grouped module, one called with tokens per expert,
a batched-einsum MMoE); storage bounded to the top pairs between full measurements; the redundant finding."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _grouped_experts import GroupedMoE
from _grouped_experts import losses as grouped_losses
from test_fused_experts import EinsumMMoE, TwoHeads, hf_losses, mmoe_losses
from test_similarity import cka_numpy, cosine_numpy
from torch import nn

import gatewatch as gw
from gatewatch.quantities.similarity.maths import similarity_matrices
from gatewatch.report import build_report

ROWS = 16


def qwen3_outputs(m: nn.Module, h: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    for e in range(m.gate_up_proj.shape[0]):
        gate, up = (h @ m.gate_up_proj[e].T).chunk(2, dim=-1)
        outs.append((F.silu(gate) * up) @ m.down_proj[e].T)
    return outs


def gpt_oss_outputs(m: nn.Module, h: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    for e in range(m.gate_up_proj.shape[0]):
        gate_up = h @ m.gate_up_proj[e] + m.gate_up_proj_bias[e]
        gate, up = gate_up[..., ::2].clamp(max=m.limit), gate_up[..., 1::2].clamp(-m.limit, m.limit)
        outs.append(((up + 1) * gate * torch.sigmoid(gate * m.alpha)) @ m.down_proj[e] + m.down_proj_bias[e])
    return outs


def grouped_outputs(m: nn.Module, h: torch.Tensor) -> list[torch.Tensor]:
    return [(F.silu(h @ m.w1[e].T) * (h @ m.w3[e].T)) @ m.w2[e].T for e in range(m.w1.shape[0])]


def einsum_outputs(m: nn.Module, h: torch.Tensor) -> list[torch.Tensor]:
    return [torch.relu(h @ m.weight[e] + m.bias[e]) for e in range(m.weight.shape[0])]


class CountedExperts(nn.Module):
    """torchtitan's calling convention: rows grouped by expert, with the number of rows of each expert."""

    def __init__(self, dim: int, hidden: int, n: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n, hidden, dim) / dim**0.5)
        self.w2 = nn.Parameter(torch.randn(n, dim, hidden) / hidden**0.5)
        self.w3 = nn.Parameter(torch.randn(n, hidden, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        parts = x.split(tokens_per_expert.tolist())
        return torch.cat([(F.silu(p @ self.w1[e].T) * (p @ self.w3[e].T)) @ self.w2[e].T
                          for e, p in enumerate(parts)])


class CountedMoE(GroupedMoE):
    """:class:`GroupedMoE` whose experts take the rows sorted by expert and the count per expert."""

    def __init__(self) -> None:
        super().__init__()
        for layer in self.layers:
            layer.experts = CountedExperts(8, 12, 4)
            layer.forward = lambda x, layer=layer: x + self._routed(layer, x)

    @staticmethod
    def _routed(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        _, weights, indices = layer.router(x)
        token = torch.arange(len(x)).repeat_interleave(indices.shape[1])
        order = indices.reshape(-1).argsort(stable=True)
        counts = torch.bincount(indices.reshape(-1), minlength=4)
        out = layer.experts(x[token[order]], counts) * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token[order], out)


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[..., dict], str, Callable[..., list]]] = {
    "qwen3_moe": (lambda: TwoHeads("qwen3_moe"), hf_losses, "backbone.layers.{}.mlp.experts", qwen3_outputs),
    "gpt_oss": (lambda: TwoHeads("gpt_oss"), hf_losses, "backbone.layers.{}.mlp.experts", gpt_oss_outputs),
    "grouped": (GroupedMoE, grouped_losses, "layers.{}.experts", grouped_outputs),
    "counted": (CountedMoE, grouped_losses, "layers.{}.experts", grouped_outputs),
    "einsum": (EinsumMMoE, mmoe_losses, "experts", einsum_outputs),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.slow
def test_fused_similarity_matches_numpy_cka_of_each_experts_own_output(case: str, tmp_path: Path) -> None:
    make, losses, path, reference = CASES[case]
    if case in ("qwen3_moe", "gpt_oss"):
        pytest.importorskip("transformers")
    model = make()
    layers = [path.format(i) for i in range(2)] if "{}" in path else [path]
    expected: dict[tuple[int, str], list[np.ndarray]] = {}
    step = [0]

    def keep(module: nn.Module, args: tuple, name: str) -> None:  # each expert's own output on the probe rows
        if step[0] % 2 == 0 and (step[0], name) not in expected:  # measured steps: 2, 4 (hooked before 2, 4)
            h = args[0].detach().reshape(-1, args[0].shape[-1])[:ROWS] if case != "einsum" else args[0][:ROWS]
            with torch.no_grad():
                expected[(step[0], name)] = [o.double().numpy() for o in reference(module, h)]

    for name in layers:
        model.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: keep(m, a, name))
    watch = gw.GateWatch(model, tasks=["a", "b"], log_dir=tmp_path, similarity_every=2, similarity_rows=ROWS,
                         tensorboard=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for s in range(1, 5):
        step[0] = s
        watch.backward(losses(model, s))
        opt.step()
        opt.zero_grad()
        watch.step()
    watch.close()
    run = gw.load_run(tmp_path)
    table = run.table("similarity")
    assert sorted(table["pool"].unique()) == sorted(layers) and sorted(table["step"].unique()) == [2, 4]
    n = len(next(iter(expected.values())))
    assert len(table) == 2 * len(layers) * n * (n - 1) // 2
    for row in table.itertuples():
        outs = expected[(row.step, row.pool)]
        a, b = int(row.expert_a), int(row.expert_b)
        assert row.cka == pytest.approx(cka_numpy(outs[a], outs[b]), abs=1e-4)
        assert row.mean_cosine == pytest.approx(cosine_numpy(outs[a], outs[b]), abs=1e-4)
    assert not [s for s in build_report(run)["skipped"] if s["view"] == "similarity"]
    assert run.meta["similarity"]["pools"][layers[0]]["fused"] is True


def test_pools_of_more_pairs_than_the_top_write_the_top_between_full_measurements(tmp_path: Path) -> None:
    model = GroupedMoE(n_experts=8, n_layers=1)
    watch = gw.GateWatch(model, tasks=["a", "b"], log_dir=tmp_path, similarity_every=1, similarity_rows=24,
                         similarity_top=5, similarity_full_every=3, tensorboard=False)
    for _ in range(8):
        watch.backward(grouped_losses(model, 1))  # one batch every step
        model.zero_grad()
        watch.step()
    watch.close()
    run = gw.load_run(tmp_path)
    table, summary = run.table("similarity"), run.table("similarity_summary")
    written = table.groupby("step").size()
    steps = sorted(written.index)  # step 1 is never measured (the experts are mapped at its first output)
    assert steps == list(range(2, 9))
    assert [written[s] for s in steps] == [28, 5, 5, 28, 5, 5, 28]  # every 3rd measurement writes all 28 pairs
    assert summary["pairs"].tolist() == [28] * 7 and summary["written"].tolist() == [written[s] for s in steps]
    # the same batch and weights (no optimizer step): the top 5 are the 5 largest pairs of the full matrix
    full = table[table["step"] == 2].nlargest(5, "cka")[["expert_a", "expert_b"]].values.tolist()
    assert sorted(table[table["step"] == 3][["expert_a", "expert_b"]].values.tolist()) == sorted(full)
    assert summary.loc[summary["step"] == 5, "mean_cka"].iloc[0] == pytest.approx(table[table["step"] == 5]["cka"]
                                                                                  .mean(), abs=1e-9)
    assert summary.loc[summary["step"] == 3, "max_cka"].iloc[0] == pytest.approx(table[table["step"] == 3]["cka"]
                                                                                 .max(), abs=1e-9)
    section = build_report(run)["similarity"]["layers.0.experts"]
    assert section["mean_cka"] == pytest.approx(summary["mean_cka"].iloc[-1])


def test_sample_form_matches_numpy_when_rows_are_fewer_than_features() -> None:
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(20, 50)) for _ in range(3)]
    xs.append(xs[0] @ np.linalg.qr(rng.normal(size=(50, 50)))[0])
    cka, cosine = similarity_matrices([torch.from_numpy(x) for x in xs]).double().numpy()
    for a in range(4):
        for b in range(4):
            assert cka[a, b] == pytest.approx(cka_numpy(xs[a], xs[b]), abs=1e-4)
            assert cosine[a, b] == pytest.approx(cosine_numpy(xs[a], xs[b]), abs=1e-4)
    assert cka[0, 3] == pytest.approx(1.0, abs=1e-5)


def test_fused_experts_whose_routing_cannot_be_forced_are_reported(tmp_path: Path) -> None:
    class Keyworded(nn.Module):  # the experts are called with keywords only: no positional input to replay
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Sequential(nn.Linear(4, 3), nn.Softmax(-1))
            self.experts = EinsumMMoE(n=3, d=4, h=5).experts
            self.heads = nn.ModuleDict({t: nn.Linear(5, 1) for t in "ab"})

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            probs = self.gate(x)
            h = (probs.unsqueeze(-1) * self.experts(x=x)).sum(1)
            return {t: head(h).squeeze(-1) for t, head in self.heads.items()}

    model = Keyworded()
    watch = gw.GateWatch(model, tasks=["a", "b"], gates={"shared": gw.Gate("gate.1")}, log_dir=tmp_path,
                         similarity_every=2, tensorboard=False)
    for _ in range(3):
        out = model(torch.randn(8, 4))
        watch.backward({t: o.pow(2).mean() for t, o in out.items()})
        model.zero_grad()
        watch.step()
    watch.close()
    run = gw.load_run(tmp_path)
    (entry,) = [s for s in build_report(run)["skipped"] if s["view"] == "similarity"]
    assert "experts" in entry["reason"] and "first positional input" in entry["reason"]
    assert not len(run.table("similarity"))
