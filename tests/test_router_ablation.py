"""Ablations through a router, on fused experts (a transformers Qwen3-MoE) and on one module per expert:
knock-out sends the expert's tokens to their next choice (its dispatch is 0, every token keeps k experts), gate
dropout masks the share of experts it is asked to and renormalises as the router does; end to end on a saved
sparse MoE run from the command line and the Ablations page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _grouped_experts import TopKRouter
from torch import nn

import gatewatch as gw
from gatewatch.ablation import chosen_experts, knockout, read_result
from gatewatch.ablation.evaluation import evaluator
from gatewatch.ablation.rates import auto_per_gate, knockout_plan
from gatewatch.cli import main
from gatewatch.masking import gate_dropout, knock_out

pytest.importorskip("transformers")

TASKS = ["flag", "score"]


def sparse_model(n_experts: int = 8, seed: int = 0) -> nn.Module:
    from gatewatch.models import SparseMoE

    torch.manual_seed(seed)
    return SparseMoE(in_dim=12, tasks=TASKS, n_experts=n_experts, top_k=2).eval()


class ModuleExpertsMoE(nn.Module):
    """A top-2 router over one ``nn.Linear`` module per expert, one head per task."""

    def __init__(self, n_experts: int = 8, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tasks = list(TASKS)
        self.router = TopKRouter(dim, n_experts, 2)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_experts))
        self.heads = nn.ModuleDict({t: nn.Linear(dim, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _, weights, idx = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(idx == e)
            if len(token):
                out = out.index_add(0, token, expert(x[token]) * weights[token, slot, None])
        return {t: head(out).squeeze(-1) for t, head in self.heads.items()}


def fused_dispatch(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The top-k indices each fused experts module receives, ``[T, k]`` per layer."""
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[1].clone()))
               for name, m in model.named_modules() if name.endswith("mlp.experts")]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def module_dispatch(model: ModuleExpertsMoE, x: torch.Tensor) -> torch.Tensor:
    """Rows each expert module receives."""
    rows = torch.zeros(len(model.experts), dtype=torch.long)
    handles = [m.register_forward_hook(lambda _m, args, _o, e=e: rows.__setitem__(e, rows[e] + len(args[0])))
               for e, m in enumerate(model.experts)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return rows


def tokens(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (n, 12), generator=torch.Generator().manual_seed(seed))


def test_router_knockout_sends_tokens_to_their_next_choice_on_fused_experts() -> None:
    model, x = sparse_model(), tokens()
    (first, _) = fused_dispatch(model, x)
    busiest = int(torch.bincount(first.reshape(-1), minlength=8).argmax())
    gate = "backbone.layers.0.mlp.gate"
    with knock_out(model, {gate: [busiest]}):
        (layer0, layer1) = fused_dispatch(model, x)
    assert (layer0 != busiest).all() and layer0.shape == first.shape  # its dispatch is 0; k = 2 for every token
    assert (layer0[:, 0] != layer0[:, 1]).all()  # two distinct experts
    kept = (first != busiest).all(-1)
    assert torch.equal(layer0[kept].sort(-1).values, first[kept].sort(-1).values)  # other tokens keep their choice
    assert (torch.bincount(layer1.reshape(-1), minlength=8) > 0).sum() > 1  # the next layer still routes


def test_router_knockout_on_one_module_per_expert() -> None:
    model, x = ModuleExpertsMoE(), torch.randn(256, 8)
    before = module_dispatch(model, x)
    with knock_out(model, {"router": [3]}):
        after = module_dispatch(model, x)
    assert before[3] > 0 and after[3] == 0 and after.sum() == before.sum() == 2 * 256


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_router_dropout_masks_the_rate_and_renormalises_as_the_router_does(rate: float) -> None:
    model, x = sparse_model(n_experts=16), tokens(256, seed=1)
    gate = model.backbone.layers[0].mlp.gate
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    with gate_dropout(model, rate, seed=3, only=["backbone.layers.0.mlp.gate"]):
        handle = gate.register_forward_hook(lambda _m, _i, out: seen.append(out))  # after the mask
        with torch.no_grad():
            model(x)
        handle.remove()
    logits, weights, idx = seen[0]
    masked = torch.isneginf(logits)
    assert masked.float().mean().item() == pytest.approx(rate, abs=0.015)  # 3,072 tokens x 16 experts
    assert not masked.gather(1, idx).any() and (idx[:, 0] != idx[:, 1]).all()  # k = 2 kept experts, never masked
    probs = torch.softmax(logits.float(), -1).gather(1, idx)
    torch.testing.assert_close(weights.float(), probs / probs.sum(-1, keepdim=True))  # norm_topk_prob


def test_router_dropout_on_one_module_per_expert_keeps_k() -> None:
    model, x = ModuleExpertsMoE(), torch.randn(512, 8)
    with gate_dropout(model, 0.9, seed=0):  # most rows keep fewer than 2: their top 2 are kept as well
        after = module_dispatch(model, x)
    assert after.sum() == 2 * 512


def test_knockout_bounded_to_the_most_and_least_loaded_experts() -> None:
    model, x = sparse_model(), tokens(128, seed=2)
    y = torch.stack([torch.rand(128).round(), torch.randn(128)], 1)
    df = knockout(model, evaluator(x, y, TASKS, ["binary", "regression"]), per_gate=2,
                  only=["backbone.layers.1.mlp.gate"])
    assert set(df["gate"]) == {"backbone.layers.1.mlp.gate"} and df["expert"].nunique() == 4
    layer1 = fused_dispatch(model, x)[1]
    load = torch.bincount(layer1.reshape(-1), minlength=8).float()
    assert chosen_experts({"g": load}, 2)["g"] == df.drop_duplicates("expert")["expert"].tolist()
    shares = df.drop_duplicates("expert").set_index("expert")["load"]
    for e, share in shares.items():
        assert share == pytest.approx(float(load[e] / load.sum()))
    assert knockout_plan([("a", 128)] * 48, None, None) == 6144 and auto_per_gate([("a", 128)] * 48, None) == 2
    assert knockout_plan([("a", 128)] * 48, ["a"], 2) == 48 * 4 and auto_per_gate([("a", 8)] * 2, None) is None
    assert knockout_plan([("a", 8), ("b", 8)], ["b"], None, [3, 5]) == 2


def test_knockout_of_chosen_experts_measures_their_load_with_them_knocked_out() -> None:
    model, x = sparse_model(), tokens(128, seed=2)
    y = torch.stack([torch.rand(128).round(), torch.randn(128)], 1)
    gate = "backbone.layers.0.mlp.gate"
    load = torch.bincount(fused_dispatch(model, x)[0].reshape(-1), minlength=8).float()
    busiest = int(load.argmax())
    df = knockout(model, evaluator(x, y, TASKS, ["binary", "regression"]), only=[gate], experts=[busiest])
    assert set(df["expert"]) == {busiest} and (df["ablated_load"] == 0).all()  # no token reaches it any more
    assert df["load"].iloc[0] == pytest.approx(float(load[busiest] / load.sum()))
    with pytest.raises(ValueError, match="has 8 experts"):
        knockout(model, evaluator(x, y, TASKS, ["binary", "regression"]), only=[gate], experts=[8])


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gatewatch.training import TrainConfig, train

    run = tmp_path_factory.mktemp("sparse") / "run"
    train(TrainConfig(model="sparse_moe", data="domains", data_kwargs={"n_train": 256, "n_val": 96, "n_test": 32},
                      model_kwargs={"n_experts": 8}, steps=10, batch_size=32, every=5, flush_every=10,
                      tensorboard=False), run, progress=False)
    return run


@pytest.mark.slow
def test_cli_knockout_and_dropout_on_a_saved_sparse_moe(sparse_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["ablate", str(sparse_run), "--knockout", "--per-gate", "1", "--json"]) == 0
    out = capsys.readouterr()
    assert "4 evaluations, about" in out.err
    result = json.loads(out.out)
    rows = result["results"]
    assert {r["gate"] for r in rows} == {"backbone.layers.0.mlp.gate", "backbone.layers.1.mlp.gate"}
    assert len({(r["gate"], r["expert"]) for r in rows}) == 4 and all(0 <= r["load"] <= 1 for r in rows)
    assert any(r["delta"] != 0 for r in rows)  # the mask reaches the model
    df, settings = read_result(sparse_run, "knockout")
    assert settings["per_gate"] == 1 and len(df) == len(rows)
    assert main(["ablate", str(sparse_run), "--knockout", "--gate", "backbone.layers.1.mlp.gate"]) == 0
    assert "8 evaluations" in capsys.readouterr().err  # the default: every expert (16 <= 256)
    assert main(["ablate", str(sparse_run), "--knockout", "--gate", "backbone.layers.1.mlp.gate", "--expert", "2",
                 "--json"]) == 0
    out = capsys.readouterr()
    rows = json.loads(out.out)["results"]
    assert "1 evaluation," in out.err
    assert {(r["gate"], r["expert"]) for r in rows} == {("backbone.layers.1.mlp.gate", 2)}
    assert all(r["ablated_load"] == 0 for r in rows) and any(r["delta"] != 0 for r in rows)
    assert main(["ablate", str(sparse_run), "--knockout", "--expert", "8"]) == 2
    assert "has 8 experts (0..7)" in capsys.readouterr().err
    assert main(["ablate", str(sparse_run), "--knockout", "--gate", "nope"]) == 2
    assert "No gate named ['nope']" in capsys.readouterr().err
    assert main(["ablate", str(sparse_run), "--dropout-sweep", "0,0.3", "--seeds", "1", "--json"]) == 0
    sweep = json.loads(capsys.readouterr().out)["results"]
    assert {r["rate"] for r in sweep} == {0.0, 0.3} and any(r["delta"] != 0 for r in sweep if r["rate"] == 0.3)


def render_page(run: str, root: str) -> None:
    from pathlib import Path

    from gatewatch.app.ablations import render

    render(Path(run), root=Path(root), selected=[Path(run)])


@pytest.mark.slow  # starts a `gatewatch ablate` process
def test_page_runs_a_bounded_knockout_on_a_saved_sparse_moe(sparse_run: Path) -> None:
    from streamlit.testing.v1 import AppTest

    from gatewatch.app.ablations import last_launch

    app = AppTest.from_function(render_page, args=(str(sparse_run), str(sparse_run.parent)), default_timeout=60).run()
    assert not app.exception
    assert any("16 evaluations" in c.value for c in app.caption)
    app.selectbox(key=f"which:knockout:{sparse_run}").select("the most and least loaded").run()
    app.number_input(key=f"per_gate:knockout:{sparse_run}").set_value(1).run()
    app.multiselect(key=f"gates:knockout:{sparse_run}").select("backbone.layers.0.mlp.gate").run()
    assert any("2 evaluations" in c.value for c in app.caption)
    app.button(key=f"start:knockout:{sparse_run}").click().run()
    launched = last_launch(sparse_run, "knockout")
    assert launched is not None and "--per-gate" in launched.proc.args
    assert launched.proc.wait(timeout=300) == 0, launched.output()
    df, _ = read_result(sparse_run, "knockout")
    assert set(df["gate"]) == {"backbone.layers.0.mlp.gate"} and df["expert"].nunique() == 2
    app = AppTest.from_function(render_page, args=(str(sparse_run), str(sparse_run.parent)), default_timeout=60).run()
    assert not app.exception and len(app.get("plotly_chart")) >= 1 and len(app.dataframe) >= 1
    assert gw.load_run(sparse_run).steps == 10
