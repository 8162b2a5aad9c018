"""GateWatchTrainerCallback: a tiny multi-task model trained for a few steps by a real Hugging Face Trainer."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import batch, task_losses, tiny_mmoe
from torch import nn

import gatewatch as gw

pytest.importorskip("transformers", reason="transformers is an optional dependency")
from transformers import Trainer, TrainingArguments

from gatewatch.integrations.huggingface import GateWatchTrainerCallback

TASKS = ["ctr", "like"]
N = 8


class MultiTask(nn.Module):
    """The tiny MMoE as ``self.net``; ``forward`` hands its task losses over by the chosen convention."""

    def __init__(self, convention: str) -> None:
        super().__init__()
        self.net = tiny_mmoe(tasks=TASKS)
        self.convention = convention
        self.logged: list[dict[str, float]] = []

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, object]:
        losses = task_losses(self.net(x), labels, TASKS)
        if self.training:
            self.logged.append({t: float(v.detach()) for t, v in losses.items()})
        total = sum(losses.values())
        if self.convention == "dict":
            return {"loss": total, "task_losses": losses}
        self.task_losses = losses
        return {"loss": total}


def train(model: MultiTask, out: Path, callback: GateWatchTrainerCallback, **args: object) -> None:
    data = [{"x": x, "labels": y} for i in range(8) for x, y in zip(*batch(i, n=N), strict=True)]
    arguments = TrainingArguments(output_dir=str(out), per_device_train_batch_size=N, learning_rate=1e-2,
                                  report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
                                  disable_tqdm=True, dataloader_num_workers=0, **args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Trainer's notes about a plain nn.Module
        Trainer(model=model, args=arguments, train_dataset=data, callbacks=[callback]).train()


def window_means(logged: list[dict[str, float]], per_window: int) -> dict[tuple[int, str], float]:
    return {(w, t): float(np.mean([b[t] for b in logged[w * per_window : (w + 1) * per_window]]))
            for w in range(len(logged) // per_window) for t in TASKS}


@pytest.mark.parametrize(("convention", "accumulate"), [("dict", 1), ("attribute", 2)])
@pytest.mark.slow
def test_trainer_run_has_gates_and_task_losses(tmp_path: Path, convention: str, accumulate: int) -> None:
    model = MultiTask(convention)
    callback = GateWatchTrainerCallback(tasks=TASKS, module="net", every=2, flush_every=4)
    train(model, tmp_path, callback, max_steps=4, gradient_accumulation_steps=accumulate)

    run = gw.load_run(tmp_path / "gatewatch")
    assert run.status == "finished" and run.steps == 4 and run.problems == []
    assert sorted(set(run.gates["step"])) == [2, 4] and set(run.gates["gate"]) == set(TASKS)
    assert (run.gates["samples"] == 2 * accumulate * N).all()  # every micro-batch of the window's steps
    want = window_means(model.logged, 2 * accumulate)
    assert len(run.losses) == 2 * len(TASKS)
    for row in run.losses.itertuples():
        assert row.loss == pytest.approx(want[(row.step // 2 - 1, row.task)], rel=1e-6)
    assert callback.watch is not None and callback.watch.closed
    assert not model._forward_hooks  # the loss hook is gone, and so are the gate hooks
    assert not any(m._forward_hooks for m in model.modules())
