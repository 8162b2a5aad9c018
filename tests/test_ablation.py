"""Expert masks, knock-out matrices, gate-dropout sweeps and the training comparison, on real small models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gatewatch as gw
from gatewatch.ablation import (
    AblationError,
    AblationStopped,
    Tracking,
    _dropout_on_first_forward,
    dropout_sweep,
    evaluator,
    job_state,
    knockout,
    knockout_summary,
    load_target,
    read_result,
    run_knockout,
    sweep_summary,
    train_comparison,
)
from gatewatch.cli import main
from gatewatch.masking import GateMasks, gate_dropout, knock_out, masked_logits, masked_probs
from gatewatch.models import MMoE, OMoE, factory_ref
from gatewatch.training import TrainConfig, load_dataset, save_model, train

torch.set_num_threads(1)

SMALL = {"n_experts": 4, "expert_hidden": [16], "expert_dim": 8, "tower_hidden": [8]}


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_renormalised(p: np.ndarray, removed: list[int]) -> np.ndarray:
    q = p.copy()
    q[:, removed] = 0.0
    return q / q.sum(-1, keepdims=True)


def hooks(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


# ------------------------------------------------------------------------------------------- masking is exact
def test_knock_out_of_a_probs_gate_equals_the_renormalised_mixture():
    torch.manual_seed(0)
    model = MMoE(in_dim=6, tasks=["a", "b"], **SMALL).eval()
    x = torch.randn(32, 6)
    with torch.no_grad():
        before = model(x)
        p = model.gates["a"](x).double().numpy()
        experts = np.stack([e(x).double().numpy() for e in model.experts], 1)  # [N, E, D]
        with knock_out(model, {"a": [1, 3]}):
            masked = model(x)
        mixed = np.einsum("ne,ned->nd", np_renormalised(p, [1, 3]), experts)
        expected = model.towers["a"](torch.from_numpy(mixed).float()).squeeze(-1)
    np.testing.assert_allclose(masked[0].numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(masked[1].numpy(), before[1].numpy())  # task b's gate untouched


class LogitsMoE(nn.Module):
    """Gates are Linear layers; the softmax is applied functionally in forward()."""

    def __init__(self, d: int = 5, e: int = 4) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(d, 3) for _ in range(e))
        self.gate_a = nn.Linear(d, e)
        self.gate_b = nn.Linear(d, e)
        self.towers = nn.ModuleList(nn.Linear(3, 1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = torch.stack([e(x) for e in self.experts], 1)
        outs = []
        for gate, tower in zip((self.gate_a, self.gate_b), self.towers, strict=True):
            p = torch.softmax(gate(x), -1)
            outs.append(tower((p.unsqueeze(-1) * f).sum(1)).squeeze(-1))
        return outs


LOGIT_GATES = {"a": gw.Gate("gate_a", output="logits", task="a"), "b": gw.Gate("gate_b", output="logits", task="b")}


def test_knock_out_of_a_logits_gate_equals_the_renormalised_mixture():
    torch.manual_seed(1)
    model = LogitsMoE()
    x = torch.randn(16, 5)
    with torch.no_grad():
        p = np_softmax(model.gate_b(x).double().numpy())
        f = np.stack([e(x).double().numpy() for e in model.experts], 1)
        with knock_out(model, {"b": [0]}, gates=LOGIT_GATES):
            masked = model(x)[1]
        expected = model.towers[1](torch.from_numpy(np.einsum("ne,ned->nd", np_renormalised(p, [0]), f)).float())
    np.testing.assert_allclose(masked.numpy(), expected.squeeze(-1).numpy(), rtol=1e-5, atol=1e-6)


class Router(nn.Module):
    """A sparse router returning (logits, top-k weights, top-k indices)."""

    def __init__(self, d: int, e: int, k: int) -> None:
        super().__init__()
        self.linear, self.k = nn.Linear(d, e), k

    @staticmethod
    def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights, idx = torch.softmax(logits, -1).topk(k, -1)
        return logits, weights / weights.sum(-1, keepdim=True), idx

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.route(self.linear(x), self.k)


class SparseMoE(nn.Module):
    def __init__(self, d: int = 5, e: int = 4, k: int = 2) -> None:
        super().__init__()
        self.router = Router(d, e, k)
        self.experts = nn.ModuleList(nn.Linear(d, 1) for _ in range(e))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        _, weights, idx = self.router(x)
        f = torch.cat([e(x) for e in self.experts], 1)  # [N, E]
        return [(weights * f.gather(1, idx)).sum(-1)]


def test_knock_out_of_a_router_tuple_goes_through_extract_and_inject():
    torch.manual_seed(2)
    model = SparseMoE()
    gate = gw.Gate("router", output="logits", extract=lambda out: out[0],
                   inject=lambda out, new: Router.route(new, 2))
    x = torch.randn(64, 5)
    with torch.no_grad():
        p = np_softmax(model.router.linear(x).double().numpy())
        f = torch.cat([e(x) for e in model.experts], 1).double().numpy()
        with knock_out(model, {"router": [2]}, gates={"router": gate}):
            masked = model(x)[0].numpy()
    q = np_renormalised(p, [2])
    top = np.argsort(-q, -1)[:, :2]
    w = np.take_along_axis(q, top, -1)
    expected = (w / w.sum(-1, keepdims=True) * np.take_along_axis(f, top, -1)).sum(-1)
    np.testing.assert_allclose(masked, expected, rtol=1e-5, atol=1e-6)
    assert not (top == 2).any()


def test_knockout_warns_when_a_router_mask_cannot_reach_the_model():
    torch.manual_seed(2)
    model = SparseMoE()
    x = torch.randn(32, 5)

    def evaluate(m: nn.Module) -> dict[str, dict[str, float]]:
        return {"y": {"loss": float(m(x)[0].pow(2).mean())}}

    logits_only = {"router": gw.Gate("router", output="logits", extract=lambda out: out[0])}
    with pytest.warns(RuntimeWarning, match="inject="):
        inert = knockout(model, evaluate, gates=logits_only)
    assert (inert["delta"] == 0).all()
    injected = {"router": gw.Gate("router", output="logits", extract=lambda out: out[0],
                                  inject=lambda out, new: Router.route(new, 2))}
    assert (knockout(model, evaluate, gates=injected)["delta"] != 0).any()


class TupleGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.softmax(self.linear(x), -1), x.sum()


class TupleGateModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = TupleGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x)[0]


def test_without_inject_the_extracted_tensor_is_replaced_where_it_sits():
    model = TupleGateModel()
    x = torch.randn(8, 5)
    with torch.no_grad():
        p = model(x).double().numpy()
        with knock_out(model, {"g": [1]}, gates={"g": gw.Gate("gate", extract=lambda out: out[0])}):
            masked = model(x).numpy()
        with knock_out(model, {"g": [1]}, gates={"g": gw.Gate("gate", extract=lambda out: out[0][:, :3])}), \
                pytest.raises(gw.GateOutputError, match="inject="):
            model(x)
    np.testing.assert_allclose(masked, np_renormalised(p, [1]), rtol=1e-6)


def test_mask_edge_cases():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    keep = torch.tensor([[True, True, False], [False, True, True], [False, False, False]])
    out = masked_probs(p, keep)
    torch.testing.assert_close(out[0], torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(out[1], torch.tensor([0.0, 0.5, 0.5]))  # kept mass 0: uniform over the kept
    torch.testing.assert_close(out[2], p[2])  # nothing kept: the row is left as it was
    logits = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = masked_logits(logits, torch.tensor([[True, False], [False, False]]))
    assert out[0, 1] == -float("inf") and out[0, 0] == 1.0
    torch.testing.assert_close(out[1], logits[1])


def test_hooks_are_removed_and_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = MMoE(in_dim=6, tasks=["a", "b"], **SMALL).train()
    x = torch.randn(8, 6)
    before_hooks, before = hooks(model), [t.detach() for t in model.eval()(x)]
    model.train()
    with knock_out(model, {"a": [0]}) as masks:
        assert masks.active and hooks(model) != before_hooks
    with pytest.raises(RuntimeError, match="boom"), gate_dropout(model, 0.5):
        raise RuntimeError("boom")
    assert hooks(model) == before_hooks and model.training
    after = model.eval()(x)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)


def test_bad_masks_are_refused_with_clear_messages():
    torch.manual_seed(0)
    model = MMoE(in_dim=6, tasks=["a", "b"], **SMALL)
    x = torch.randn(4, 6)
    with pytest.raises(KeyError, match="gates of this model are"):
        knock_out(model, {"nope": [0]})
    with pytest.raises(KeyError, match="no expert named"):
        knock_out(model, {"a": ["9"]})
    with knock_out(model, {"a": [7]}), pytest.raises(IndexError, match="has 4 experts"):
        model(x)
    with knock_out(model, {"a": [0, 1, 2, 3]}), pytest.raises(ValueError, match="keep one"):
        model(x)
    with pytest.raises(ValueError, match="0 <= rate < 1"):
        gate_dropout(model, 1.0)


def test_a_watch_sees_the_gate_before_masks_added_after_it_and_the_masked_gate_otherwise(tmp_path):
    torch.manual_seed(0)
    model = MMoE(in_dim=6, tasks=["a", "b"], **SMALL).train()
    x = torch.randn(64, 6)

    def share_of_expert_0(log_dir: Path, *, mask_first: bool) -> float:
        masks = knock_out(model, {"a": [0]})
        if mask_first:
            masks.apply()
        with gw.GateWatch(model, tasks=["a", "b"], log_dir=log_dir, every=1, tensorboard=False) as watch:
            with masks:
                model(x)
            watch.step()
        shares = gw.load_run(log_dir).shares
        return float(shares[(shares["gate"] == "a") & (shares["expert"] == 0)]["share"].iloc[0])

    assert share_of_expert_0(tmp_path / "watch-first", mask_first=False) > 0.05
    assert share_of_expert_0(tmp_path / "mask-first", mask_first=True) == 0.0
    assert hooks(model) == [0] * len(hooks(model))


# ------------------------------------------------------------------------------------------- gate dropout
def test_gate_dropout_masks_each_expert_at_the_rate_renormalises_and_is_reproducible():
    torch.manual_seed(0)
    model = MMoE(in_dim=6, tasks=["a", "b"], **SMALL).eval()
    x = torch.randn(20_000, 6)
    seen: list[torch.Tensor] = []
    capture = model.gates["a"][1].register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    with torch.no_grad():
        p = model.gates["a"](x)
        with gate_dropout(model, 0.3, seed=5):
            model(x)
        with gate_dropout(model, 0.3, seed=5):
            model(x)
        with GateMasks(model, {}):  # no mask: nothing changes
            model(x)
    capture.remove()
    # the capture hook was registered first: it sees the gate's own output, not the masked one
    assert all(torch.equal(s, p) for s in seen)
    with torch.no_grad(), gate_dropout(model, 0.3, seed=5, prepend=False):
        out_seen: list[torch.Tensor] = []
        late = model.gates["a"][1].register_forward_hook(lambda _m, _i, out: out_seen.append(out.detach()))
        model(x)
        late.remove()
    q = out_seen[0]
    dropped = q == 0
    np.testing.assert_allclose(q.sum(-1).numpy(), 1.0, atol=1e-5)
    assert not dropped.all(-1).any()
    # an expert reads 0 when dropped, except the top one of a row that lost them all (kept): 0.3 - 0.3^4 / 4
    assert abs(dropped.float().mean().item() - (0.3 - 0.3**4 / 4)) < 0.005
    kept = ~dropped
    np.testing.assert_allclose(q.numpy(), (p * kept / (p * kept).sum(-1, keepdim=True)).numpy(), rtol=1e-5)
    with torch.no_grad():
        a = [gate_dropout_run(model, x[:100], seed) for seed in (1, 1, 2)]
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])


def gate_dropout_run(model: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    with gate_dropout(model, 0.5, seed=seed):
        return model(x)[0]


def test_training_comparison_dropout_hooks_run_after_the_watch():
    torch.manual_seed(0)
    model = MMoE(in_dim=6, tasks=["a", "b"], **SMALL).train()
    _dropout_on_first_forward(model, None, ["a", "b"], 0.5, seed=0)
    seen: list[torch.Tensor] = []
    model.gates["a"][1].register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))  # "the watch"
    x = torch.randn(256, 6)
    out = model(x)
    assert (seen[0] > 0).all()  # the watch saw the gate's own weights
    with torch.no_grad():
        assert not torch.allclose(out[0], model.towers["a"](
            torch.einsum("ne,ned->nd", model.gates["a"](x), torch.stack([e(x) for e in model.experts], 1))
        ).squeeze(-1))  # while the experts' mixture was dropped out


# ------------------------------------------------------------------------------------------- polarized vs healthy
def binary_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, torch.stack([(x[:, 0] + 0.5 * x[:, 1] > 0), (x[:, 0] - 0.5 * x[:, 2] > 0)], 1).float()


def trained_mmoe(*, polarized: bool, gate_dropout_rate: float) -> MMoE:
    """Polarized: task a's gate is fixed on expert 0 (zero weights, bias 8). Healthy: free gates, 10% gate dropout."""
    torch.manual_seed(0)
    model = MMoE(in_dim=8, tasks=["a", "b"], gate_dropout=gate_dropout_rate, **SMALL)
    if polarized:
        linear = model.gates["a"][0]
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.copy_(torch.tensor([8.0, 0.0, 0.0, 0.0]))
        linear.requires_grad_(False)
    x, y = binary_data(4000, 0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(150):
        idx = torch.randint(0, len(x), (128,), generator=g)
        loss = sum(F.binary_cross_entropy_with_logits(o, y[idx, k]) for k, o in enumerate(model(x[idx])))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def polarized_and_healthy() -> dict[str, tuple[MMoE, object]]:
    x, y = binary_data(1000, 1)
    evaluate = evaluator(x, y, ["a", "b"], ["binary", "binary"])
    return {"polarized": (trained_mmoe(polarized=True, gate_dropout_rate=0.0), evaluate),
            "healthy": (trained_mmoe(polarized=False, gate_dropout_rate=0.1), evaluate)}


@pytest.mark.slow
def test_knockout_of_the_dominant_expert_hurts_the_polarized_task_most(polarized_and_healthy):
    results = {name: knockout(model, evaluate) for name, (model, evaluate) in polarized_and_healthy.items()}
    pol = results["polarized"]
    assert len(pol) == 2 * 4 * 2 * 2  # gates x experts x tasks x metrics
    assert set(pol.columns) >= {"gate", "expert", "expert_name", "task", "metric", "base", "ablated", "delta"}
    loss = pol[(pol["task"] == "a") & (pol["metric"] == "loss")].set_index(["gate", "expert"])["harm"]
    dominant = loss[("a", 0)]
    assert loss.idxmax() == ("a", 0)
    assert dominant > 20 * loss.drop(("a", 0)).abs().max()
    auc = pol[(pol["task"] == "a") & (pol["metric"] == "auc")].set_index(["gate", "expert"])
    assert auc.loc[("a", 0), "delta"] < 0 and auc.loc[("a", 0), "harm"] == -auc.loc[("a", 0), "delta"]
    # task b never reads gate a: knocking experts out of gate a leaves it exactly as it was
    assert (pol[(pol["task"] == "b") & (pol["gate"] == "a")]["delta"] == 0).all()
    summary = {name: knockout_summary(df).set_index(["task", "metric"]) for name, df in results.items()}
    assert summary["polarized"].loc[("a", "loss"), "concentration"] > 0.99
    assert summary["healthy"].loc[("a", "loss"), "concentration"] < 0.8  # the damage is spread
    assert summary["healthy"].loc[("a", "loss"), "max_harm"] < 0.1 * dominant


@pytest.mark.slow
def test_dropout_sweep_shows_the_polarized_task_brittle_and_the_healthy_one_graceful(polarized_and_healthy):
    sweeps = {name: dropout_sweep(model, evaluate, rates=(0, 0.1, 0.3), seeds=(0, 1))
              for name, (model, evaluate) in polarized_and_healthy.items()}
    df = sweeps["polarized"]
    assert len(df) == 3 * 2 * 2 * 2 and (df[df["rate"] == 0]["delta"] == 0).all()
    harm = {name: sweep_summary(s).set_index(["task", "metric", "rate"])["harm"] for name, s in sweeps.items()}
    for rate in (0.1, 0.3):
        assert harm["polarized"][("a", "loss", rate)] > 5 * max(harm["healthy"][("a", "loss", rate)], 1e-6)
    assert harm["polarized"][("a", "loss", 0.3)] > harm["polarized"][("a", "loss", 0.1)] > 0


# ------------------------------------------------------------------------------------------- run directories and CLI
SPLITS = {"n_train": 400, "n_val": 200, "n_test": 50, "dim": 6, "seed": 0}


def saved_run(path: Path, model_cls: type[nn.Module] = MMoE, **kwargs: object) -> Path:
    """A run directory written by save_model (no training loop): checkpoint.pt + model.json."""
    splits = load_dataset("synthetic", **SPLITS)
    torch.manual_seed(0)
    model = model_cls(in_dim=splits.in_dim, tasks=splits.tasks, **{**SMALL, **kwargs})
    save_model(path, model, factory=factory_ref(model), data=splits.ref, tasks=splits.tasks,
               task_types=splits.task_types)
    return path


def test_cli_knockout_json_schema_and_files(tmp_path, capsys):
    run = saved_run(tmp_path / "run")
    assert main(["ablate", str(run), "--knockout", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["results"]
    assert len(rows) == 2 * 4 * 2 * 2
    types = {"gate": str, "expert": int, "task": str, "metric": str, "base": float, "ablated": float, "delta": float}
    for row in rows:
        assert all(isinstance(row[k], t) for k, t in types.items())
        assert row["delta"] == pytest.approx(row["ablated"] - row["base"])
    df, settings = read_result(run, "knockout")
    assert len(df) == len(rows) and settings["split"] == "val" and settings["gates"] == ["t1", "t2"]
    assert job_state(run, "knockout").status == "finished"
    assert main(["ablate", str(run), "--knockout"]) == 0
    text = capsys.readouterr().out
    assert "task t1 - mse" in text and "knockout.parquet" in text


def test_cli_dropout_sweep_json(tmp_path, capsys):
    run = saved_run(tmp_path / "run")
    assert main(["ablate", str(run), "--dropout-sweep", "0,0.2", "--seeds", "2", "--split", "test", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    df = pd.DataFrame(out["results"])
    assert sorted(df["rate"].unique()) == [0.0, 0.2] and sorted(df["seed"].unique()) == [0, 1]
    assert {"rate", "seed", "task", "metric", "value", "delta"} <= set(df.columns)
    assert read_result(run, "dropout_sweep")[1]["split"] == "test"


def corrupt_other_model(run: Path, tmp_path: Path) -> None:
    """model.json of the run describes an MMoE, its checkpoint is an OMoE's."""
    other = saved_run(tmp_path / "other", OMoE)
    shutil.copy(other / "checkpoint.pt", run / "checkpoint.pt")


@pytest.mark.parametrize("case, args, message", [
    ("missing", ["--knockout"], "is not a folder"),
    ("empty", ["--knockout"], "has no checkpoint.pt"),
    ("ok", ["--knockout", "--factory", "gatewatch.models:OMoE"], "different architecture"),
    ("ok", ["--knockout", "--factory", "no_such_module:build"], "cannot import"),
    ("ok", ["--knockout", "--factory", "not a factory"], "module:function"),
    ("other", ["--knockout"], "different architecture"),
    ("ok", ["--dropout-sweep", "0,1.5"], "[0, 1)"),
    ("ok", ["--dropout-sweep", "0,x"], "comma-separated"),
    ("ok", ["--train-compare", "0,0.1", "--steps", "0"], "positive integer"),
    ("ok", ["--dropout-sweep", "0.1", "--seeds", "0"], "--seeds"),
    ("foreign", ["--knockout"], "outside the gatewatch package"),
    ("no data", ["--knockout"], "no data reference"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, case, args, message):
    run = tmp_path / "run"
    if case == "empty":
        run.mkdir()
    elif case != "missing":
        saved_run(run)
    if case == "other":
        corrupt_other_model(run, tmp_path)
    if case in ("foreign", "no data"):
        meta = json.loads((run / "model.json").read_text())
        change = {"factory": "os:system"} if case == "foreign" else {"data": None}
        (run / "model.json").write_text(json.dumps({**meta, **change}))
    assert main(["ablate", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (run / "ablations").exists()


def test_a_run_whose_recorded_gates_are_not_in_the_model_is_refused(tmp_path):
    run = saved_run(tmp_path / "run")
    (run / "run.json").write_text(json.dumps({"format": "gatewatch-run/1", "tasks": ["t1", "t2"], "gates": [
        {"name": "t1", "task": "t1", "path": "router.t1", "output": "probs"}]}))
    with pytest.raises(AblationError, match="not the model this run watched"):
        load_target(run)
    assert not (run / "ablations").exists()


def test_stopping_a_job_writes_no_result(tmp_path):
    run = saved_run(tmp_path / "run")
    with pytest.raises(AblationStopped):
        run_knockout(run, tracking=Tracking(track=True, should_stop=lambda: True))
    assert read_result(run, "knockout") is None
    assert job_state(run, "knockout").status == "stopped"


@pytest.mark.slow
def test_train_comparison_trains_real_child_runs(tmp_path):
    parent = tmp_path / "run"
    config = TrainConfig(model="mmoe", model_kwargs=SMALL, data="synthetic", data_kwargs=SPLITS, steps=10, every=5,
                         flush_every=10, tensorboard=False, lr=1e-2)
    train(config, parent, progress=False)
    seen: list[tuple[int, int]] = []
    df = train_comparison(parent, rates=(0, 0.2), seeds=(0,), steps=10,
                          tracking=Tracking(track=True, progress=lambda d, t, _m: seen.append((d, t))))
    assert sorted(df["rate"].unique()) == [0.0, 0.2] and set(df["task"]) == {"t1", "t2"}
    assert {"polarized_gates", "dead_experts", "mean_entropy", "run_dir"} <= set(df.columns)
    assert df["mean_entropy"].between(0, 1).all() and (df["steps"] == 10).all()
    child = parent / df["run_dir"].iloc[-1]
    assert child.name == "rate-0.2-seed-0" and gw.load_run(child).meta["user_config"]["gate_dropout"] == 0.2
    assert gw.load_run(child).status == "finished"
    assert seen[-1] == (20, 20)
    assert not list((parent / "ablations" / "train").glob(".staging-*"))
    with pytest.raises(AblationStopped):
        train_comparison(parent, rates=(0.1,), seeds=(0,), steps=10, tracking=Tracking(should_stop=lambda: True))
    assert (parent / "ablations" / "train" / "rate-0.2-seed-0").is_dir()  # the previous comparison is intact
    assert len(read_result(parent, "train")[0]) == len(df)


def test_train_comparison_of_a_run_saved_outside_the_loop_uses_masking_hooks(tmp_path):
    run = saved_run(tmp_path / "run")
    df = train_comparison(run, rates=(0.3,), seeds=(0,), steps=5)
    assert (df["steps"] == 5).all() and df["value"].notna().all()
    child = run / df["run_dir"].iloc[0]
    assert {g["name"] for g in gw.load_run(child).meta["gates"]} == {"t1", "t2"}


# ------------------------------------------------------------------------------------------- figures
@pytest.mark.slow
def test_figures_draw_every_result_and_say_when_there_is_none(polarized_and_healthy):
    from gatewatch.figures.ablation import comparison_figure, knockout_heatmap, sweep_curves

    model, evaluate = polarized_and_healthy["polarized"]
    ko = knockout(model, evaluate)
    fig = knockout_heatmap(ko)
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]  # one panel per task, AUC (binary tasks)
    heat = fig.data[0]
    assert heat.zmid == 0 and heat.zmin == -heat.zmax and list(heat.y) == ["a", "b"]
    expected = ko[(ko["task"] == "a") & (ko["metric"] == "auc") & (ko["gate"] == "a")].sort_values("expert")["harm"]
    np.testing.assert_allclose(heat.z[0], expected.to_numpy())
    assert "loss" in knockout_heatmap(ko, metric="loss").layout.annotations[0].text
    sweep = dropout_sweep(model, evaluate, rates=(0, 0.2), seeds=(0, 1))
    curves = sweep_curves(sweep)
    means = [t for t in curves.data if t.mode == "lines+markers"]
    assert len(means) == 2 and list(means[0].x) == [0.0, 0.2]
    both = pd.concat([sweep.assign(run="p"), sweep.assign(run="q")])
    assert sum(t.showlegend is True for t in sweep_curves(both).data) == 2
    comparison = pd.DataFrame({
        "rate": [0.0, 0.0, 0.1, 0.1], "seed": [0, 1, 0, 1], "task": "a", "metric": "auc", "split": "val",
        "value": [0.9, 0.91, 0.92, 0.93], "polarized_gates": [1.0, 1.0, 0.0, 0.0], "dead_experts": 0.0,
        "mean_entropy": [0.2, 0.3, 0.6, 0.7], "max_top_share": 0.5, "steps": 10, "run_dir": "x"})
    boxes = comparison_figure(comparison)
    assert len(boxes.data) == 2 * 4  # (task a + 3 health panels) x 2 rates
    for empty in (knockout_heatmap, sweep_curves, comparison_figure):
        assert "yet" in empty(pd.DataFrame()).layout.annotations[0].text


# ------------------------------------------------------------------------------------------- dashboard
def render_page(run: str, root: str) -> None:
    from pathlib import Path

    from gatewatch.app.ablations import render

    render(Path(run), root=Path(root), selected=[Path(run)])


@pytest.mark.slow
def test_page_shows_saved_results_and_guards_foreign_factories(tmp_path):
    from streamlit.testing.v1 import AppTest

    run = saved_run(tmp_path / "run")
    run_knockout(run)
    app = AppTest.from_function(render_page, args=(str(run), str(tmp_path)), default_timeout=30).run()
    assert not app.exception
    assert [t.label for t in app.tabs] == ["Expert knock-out", "Gate-dropout sweep", "Training with gate dropout",
                                           "Task removal"]
    assert len(app.dataframe) == 2  # the knock-out summary and each knock-out; the other tabs say there is nothing yet
    assert (app.dataframe[1].value["ablated_load"] == 0).all()  # a dense gate's expert gets no weight once knocked out
    assert any("No gate-dropout sweep results" in i.value for i in app.info)
    assert not any(b.disabled for b in app.button)
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, "factory": "my_models:build"}))
    app = AppTest.from_function(render_page, args=(str(run), str(tmp_path)), default_timeout=30).run()
    assert "my_models:build" in app.checkbox[0].label and all(b.disabled for b in app.button)
    app.checkbox[0].check().run()
    assert not any(b.disabled for b in app.button)
    empty = tmp_path / "bare"
    empty.mkdir()
    app = AppTest.from_function(render_page, args=(str(empty), str(tmp_path)), default_timeout=30).run()
    assert any("saved no model" in i.value for i in app.info) and all(b.disabled for b in app.button)


@pytest.mark.slow  # starts `gatewatch ablate` processes
def test_launch_runs_the_cli_in_the_background_and_reports_bad_input(tmp_path):
    from gatewatch.app.ablations import Options, ablate_command, launch

    run, broken = saved_run(tmp_path / "run"), saved_run(tmp_path / "broken")
    cmd = ablate_command(run, "dropout_sweep", Options(rates=[0.0, 0.2], seeds=1, allow_factory=True))
    assert cmd[-7:] == ["--dropout-sweep", "0,0.2", "--split", "val", "--seeds", "1", "--allow-factory"]
    (broken / "checkpoint.pt").unlink()
    job = launch(run, "dropout_sweep", Options(rates=[0.0, 0.2], seeds=1))
    bad = launch(broken, "knockout", Options())  # both processes run at once
    with pytest.raises(AblationError, match="already running"):
        launch(run, "dropout_sweep", Options(rates=[0.1]))
    assert job.proc.wait(timeout=120) == 0, job.output()
    assert len(read_result(run, "dropout_sweep")[0]) == 2 * 2 * 2
    assert job_state(run, "dropout_sweep").status == "finished"
    assert bad.proc.wait(timeout=120) == 2 and "no checkpoint.pt" in bad.output()
    assert not (broken / "ablations").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masks_on_cuda_match_the_cpu_and_draw_on_the_device():
    torch.manual_seed(0)
    model = MMoE(in_dim=6, tasks=["a", "b"], **SMALL).eval()
    x = torch.randn(512, 6)
    with torch.no_grad(), knock_out(model, {"a": [1]}):
        cpu = model(x)[0]
    model.cuda()
    with torch.no_grad():
        with knock_out(model, {"a": [1]}):
            gpu = model(x.cuda())[0]
        runs = []
        for _ in range(2):
            with gate_dropout(model, 0.3, seed=4):
                runs.append(model(x.cuda())[0])
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
    assert torch.equal(runs[0], runs[1]) and runs[0].is_cuda
