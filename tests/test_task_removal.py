"""Task removal: retraining without a task (loss weight 0) against the full model, from the API and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from gatewatch.ablation import AblationError, read_result, removal_summary, task_removal
from gatewatch.cli import main
from gatewatch.models import MMoE
from gatewatch.training import TrainConfig, train

torch.set_num_threads(1)
SMALL = {"n_experts": 2, "expert_hidden": [8], "expert_dim": 4, "tower_hidden": [4]}
SPLITS = {"n_train": 256, "n_val": 128, "n_test": 128, "seed": 0}


def test_summary_gives_mean_spread_and_verdict() -> None:
    rows = [{"dropped": "marital", "seed": s, "task": "income", "metric": "auc", "full": 0.90, "without": 0.90 + d,
             "delta": d, "harm": -d} for s, d in enumerate([0.003, 0.004, 0.005])]
    rows += [{"dropped": "income", "seed": s, "task": "marital", "metric": "auc", "full": 0.9, "without": 0.9 + d,
              "delta": d, "harm": -d} for s, d in enumerate([-0.01, 0.012, 0.0])]
    summary = removal_summary(pd.DataFrame(rows)).set_index("dropped")
    se = pd.Series([0.003, 0.004, 0.005]).std(ddof=1) / math.sqrt(3)
    assert summary.loc["marital", "delta"] == pytest.approx(0.004) and summary.loc["marital", "se"] == pytest.approx(se)
    assert summary.loc["marital", "sentence"] == \
        "without marital, income AUC +0.004 (+-0.000577): marital hurts income (negative transfer)"
    assert summary.loc["income", "verdict"] == "no clear effect"


def test_api_trains_full_and_reduced_models_with_the_same_seeds() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = torch.stack([x[:, 0], x[:, 1], -x[:, 0]], 1)
    tasks = ["a", "b", "c"]
    calls: list[tuple[dict[str, float], int]] = []

    def factory(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return MMoE(in_dim=4, tasks=tasks, **SMALL)

    def train_fn(model: nn.Module, weights: dict[str, float], seed: int) -> None:
        calls.append((dict(weights), seed))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(30):
            outputs = zip(tasks, model(x), strict=True)
            loss = sum(weights[t] * (p - y[:, i]).pow(2).mean() for i, (t, p) in enumerate(outputs))
            opt.zero_grad()
            loss.backward()
            opt.step()

    def evaluate(model: nn.Module) -> dict[str, dict[str, float]]:
        outputs = zip(tasks, model(x), strict=True)
        return {t: {"mse": float((p - y[:, i]).pow(2).mean())} for i, (t, p) in enumerate(outputs)}

    df = task_removal(factory, train_fn, evaluate, tasks, drop=["c"], seeds=(0, 1))
    assert calls == [({"a": 1.0, "b": 1.0, "c": 1.0}, 0), ({"a": 1.0, "b": 1.0, "c": 0.0}, 0),
                     ({"a": 1.0, "b": 1.0, "c": 1.0}, 1), ({"a": 1.0, "b": 1.0, "c": 0.0}, 1)]
    assert set(df["task"]) == {"a", "b"} and set(df["dropped"]) == {"c"} and len(df) == 4
    assert (df["delta"] == df["without"] - df["full"]).all() and (df["harm"] == df["delta"]).all()  # MSE: up = worse
    with pytest.raises(AblationError, match="Unknown task"):
        task_removal(factory, train_fn, evaluate, tasks, drop=["z"])


def trained_run(path: Path, **data: object) -> Path:
    config = TrainConfig(model="mmoe", model_kwargs=SMALL, data="synthetic", data_kwargs={**SPLITS, **data},
                         steps=10, every=5, flush_every=10, tensorboard=False, lr=1e-2)
    train(config, path, progress=False)
    return path


@pytest.mark.slow  # trains six short runs
def test_cli_drop_task_on_a_saved_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = trained_run(tmp_path / "run")
    assert main(["ablate", str(run), "--drop-task", "--seeds", "2", "--steps", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "task_removal" and {r["dropped"] for r in out["summary"]} == {"t1", "t2"}
    assert all(r["sentence"].startswith(f"without {r['dropped']}, {r['task']} ") for r in out["summary"])
    df, settings = read_result(run, "task_removal")
    assert settings["drop"] == ["t1", "t2"] and settings["steps"] == 5 and len(df) == len(out["results"])
    assert main(["ablate", str(run), "--drop-task", "t2", "--seeds", "1", "--steps", "5"]) == 0
    assert "without t2, t1 MSE" in capsys.readouterr().out


@pytest.mark.slow  # trains a run per case
@pytest.mark.parametrize("args, message", [
    (["--drop-task", "nope"], "Unknown task(s) ['nope']"),
    (["--drop-task", "t1", "--steps", "0"], "positive integer"),
])
def test_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                               message: str) -> None:
    run = trained_run(tmp_path / "run")
    assert main(["ablate", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (run / "ablations" / "task_removal.parquet").exists()


def test_cli_no_checkpoint_and_one_task_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["ablate", str(tmp_path / "empty"), "--drop-task"]) == 2
    assert "has no checkpoint.pt" in capsys.readouterr().err
    with pytest.raises(AblationError, match="has one task"):
        task_removal(lambda s: nn.Linear(1, 1), lambda m, w, s: None, lambda m: {}, ["only"])


def test_removal_figure_signs_bars_so_that_up_is_better_without_the_task() -> None:
    from gatewatch.figures import removal_figure

    summary = pd.DataFrame([
        {"dropped": "b", "task": "a", "metric": "auc", "full": 0.8, "delta": 0.01, "se": 0.002, "seeds": 3,
         "verdict": "hurts", "sentence": "without b, a AUC +0.01 (+-0.002): b hurts a (negative transfer)"},
        {"dropped": "a", "task": "b", "metric": "mse", "full": 0.3, "delta": 0.02, "se": 0.003, "seeds": 3,
         "verdict": "helps", "sentence": "without a, b MSE +0.02 (+-0.003): a helps b"}])
    bar = removal_figure(summary).data[0]
    assert list(bar.x) == ["a without b", "b without a"] and list(bar.y) == [0.01, -0.02]
    assert list(bar.error_y.array) == pytest.approx([0.004, 0.006])
    assert list(bar.marker.color) == ["#B2182B", "#2166AC"]
