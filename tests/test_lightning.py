"""GateWatchCallback: a tiny LightningModule trained for a few steps by a real Lightning Trainer."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import batch, task_losses, tiny_mmoe

import gatewatch as gw

L = pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning is an optional dependency")
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from gatewatch.integrations.lightning import GateWatchCallback  # noqa: E402

TASKS = ["ctr", "like"]
N = 16


class MultiTask(L.LightningModule):
    """Wraps the tiny MMoE as ``self.model``; hands its task losses over by the chosen convention."""

    def __init__(self, convention: str = "dict", fail_at: int | None = None) -> None:
        super().__init__()
        self.model = tiny_mmoe(tasks=TASKS)
        self.convention, self.fail_at = convention, fail_at
        self.logged: list[dict[str, float]] = []

    def training_step(self, data: list[torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor] | torch.Tensor:
        if batch_idx == self.fail_at:
            raise RuntimeError("boom")
        x, y = data
        losses = task_losses(self.model(x), y, TASKS)
        self.logged.append({t: float(v.detach()) for t, v in losses.items()})
        total = sum(losses.values())
        if self.convention == "dict":
            return {"loss": total, "task_losses": losses}
        if self.convention == "attribute":
            self.task_losses = losses
        return total

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        xs, ys = zip(*(batch(i, n=N) for i in range(12)), strict=True)
        data = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
        return torch.utils.data.DataLoader(data, batch_size=N, shuffle=False)


def fit(module: MultiTask, root: Path, callback: GateWatchCallback, **trainer_kwargs: object) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, default_root_dir=root, callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module)
    return trainer


def window_means(logged: list[dict[str, float]], per_window: int) -> dict[tuple[int, str], float]:
    """Mean logged loss of each task per window of ``per_window`` batches, keyed by (window index, task)."""
    return {(w, t): float(np.mean([b[t] for b in logged[w * per_window : (w + 1) * per_window]]))
            for w in range(len(logged) // per_window) for t in TASKS}


def test_dict_convention_with_the_trainers_tensorboard_logger(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = MultiTask("dict")
    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = GateWatchCallback(tasks=TASKS, every=2, flush_every=4)
    fit(module, tmp_path, callback, max_steps=6, logger=logger)

    run = gw.load_run(Path(logger.log_dir) / "gatewatch")
    assert run.status == "finished" and run.steps == 6 and run.problems == []
    assert sorted(set(run.gates["step"])) == [2, 4, 6] and set(run.gates["gate"]) == set(TASKS)
    assert (run.gates["samples"] == 2 * N).all()
    want = window_means(module.logged, 2)
    for row in run.losses.itertuples():
        assert row.loss == pytest.approx(want[(row.step // 2 - 1, row.task)], rel=1e-6)
    assert len(run.losses) == 3 * len(TASKS)
    # gate scalars went into the logger's own TensorBoard run, not a second one in the run directory
    assert not (run.path / "tensorboard").exists()
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert [e.step for e in events.Scalars("gate/ctr/entropy")] == [2, 4, 6]
    assert len(events.Scalars("loss/like")) == 3


def test_attribute_convention_with_gradient_accumulation_and_a_submodule(tmp_path: Path) -> None:
    module = MultiTask("attribute")
    callback = GateWatchCallback(tasks=TASKS, module="model", every=1, flush_every=2, log_dir=tmp_path / "run")
    fit(module, tmp_path, callback, max_steps=3, accumulate_grad_batches=2, logger=False)

    run = gw.load_run(tmp_path / "run")
    assert run.status == "finished" and run.steps == 3
    assert sorted(set(run.gates["step"])) == [1, 2, 3]
    assert (run.gates["samples"] == 2 * N).all()  # both micro-batches of an optimizer step
    assert {g["path"] for g in run.meta["gates"]} == {"gates.ctr.2", "gates.like.2"}  # paths inside self.model
    want = window_means(module.logged, 2)
    for row in run.losses.itertuples():
        assert row.loss == pytest.approx(want[(row.step - 1, row.task)], rel=1e-6)
    assert (run.path / "tensorboard").is_dir()  # no TensorBoardLogger: the run keeps its own events
    assert module.task_losses is None  # read, then reset


def test_a_failing_fit_marks_the_run_crashed_and_missing_losses_warn(tmp_path: Path) -> None:
    module = MultiTask("plain", fail_at=3)
    callback = GateWatchCallback(tasks=TASKS, every=1, log_dir=tmp_path / "run")
    with pytest.warns(UserWarning, match="no per-task losses"), pytest.raises(RuntimeError, match="boom"):
        fit(module, tmp_path, callback, max_steps=6, logger=False)
    run = gw.load_run(tmp_path / "run")
    assert run.meta["status"] == "crashed" and run.meta["error"] == "RuntimeError: boom"
    assert sorted(set(run.gates["step"])) == [1, 2, 3] and len(run.losses) == 0
    assert callback.watch is not None and callback.watch.closed


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="every must be a positive integer"):
        GateWatchCallback(every=0)
    with pytest.raises(TypeError, match=r"unknown GateWatch arguments \['treshold'\]"):
        GateWatchCallback(treshold=0.8)
    with pytest.raises(AttributeError, match="has no submodule 'net'"):
        GateWatchCallback(module="net").spec.target(MultiTask())
