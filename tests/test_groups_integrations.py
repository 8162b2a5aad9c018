"""Sample groups through the framework callbacks: ``group_field`` names the batch field holding each sample's
group; the per-group share equals numpy over the gate outputs the test records itself, under a real Lightning
Trainer and a real Hugging Face Trainer."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import batch, task_losses, tiny_mmoe
from torch import nn

import gatewatch as gw

TASKS, GROUPS, N, BATCHES = ["ctr", "like"], ["a", "b", "c"], 8, 6


def rows() -> list[dict[str, torch.Tensor]]:
    """Samples with a group each (some -1: left out)."""
    out = []
    for i in range(BATCHES):
        x, y = batch(i, n=N)
        domain = torch.randint(-1, len(GROUPS), (N,), generator=torch.Generator().manual_seed(i))
        out += [{"x": x[j], "labels": y[j], "domain": domain[j]} for j in range(N)]
    return out


def record(gate: nn.Module, seen: list[np.ndarray]) -> None:
    gate.register_forward_hook(lambda m, _i, out: seen.append(out.detach().numpy().copy()) if m.training else None)


def check(run_dir: Path, seen: list[np.ndarray], labels: np.ndarray, every: int) -> None:
    routing = gw.load_run(run_dir).table("group_routing")
    gate = next(g for g in routing["gate"].unique() if "ctr" in g)
    first = routing[(routing["gate"] == gate) & (routing["step"] == every)].set_index("group")
    probs = np.concatenate(seen[:every])
    mine_labels = labels[: every * N]
    assert len(first) >= 2 and (mine_labels == -1).any()
    for g, name in enumerate(GROUPS):
        mask = mine_labels == g
        if not mask.any():
            assert name not in first.index
            continue
        assert first.loc[name, "tokens"] == mask.sum()
        np.testing.assert_allclose(first.loc[name, "share"], probs[mask].mean(0), atol=1e-6)


def test_lightning_group_field(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning is an optional dependency")
    from gatewatch.integrations.lightning import GateWatchCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_mmoe(tasks=TASKS)

        def training_step(self, data: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
            losses = task_losses(self.model(data["x"]), data["labels"], TASKS)
            return {"loss": sum(losses.values()), "task_losses": losses}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-2)

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(rows(), batch_size=N, shuffle=False)

    module = Module()
    seen: list[np.ndarray] = []
    record(module.model.gates["ctr"], seen)
    callback = GateWatchCallback(tasks=TASKS, module="model", log_dir=tmp_path / "run", every=2,
                                 sample_groups=GROUPS, group_field="domain", tensorboard=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, callbacks=[callback], max_epochs=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        logger=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module)
    check(tmp_path / "run", seen, np.array([int(r["domain"]) for r in rows()]), 2)


def test_huggingface_group_field_is_taken_out_of_the_inputs(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="transformers is an optional dependency")
    from transformers import Trainer, TrainingArguments

    from gatewatch.integrations.huggingface import GateWatchTrainerCallback

    class Model(nn.Module):  # its forward does not take the group field
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_mmoe(tasks=TASKS)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
            losses = task_losses(self.net(x), labels, TASKS)
            return {"loss": sum(losses.values()), "task_losses": losses}

    model = Model()
    seen: list[np.ndarray] = []
    record(model.net.gates["ctr"], seen)
    labels: list[np.ndarray] = []  # the Trainer shuffles: the labels as each forward got them (before the callback)
    model.register_forward_pre_hook(lambda m, _a, kw: labels.append(kw["domain"].numpy().copy()) if m.training
                                    else None, with_kwargs=True)
    callback = GateWatchTrainerCallback(tasks=TASKS, log_dir=tmp_path / "run", every=2, sample_groups=GROUPS,
                                        group_field="domain", tensorboard=False)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=N, learning_rate=1e-2,
                             report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
                             num_train_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=args, train_dataset=rows(), callbacks=[callback]).train()
    assert len(labels) == BATCHES  # Model.forward takes no `domain`: the callback took it out of every call
    check(tmp_path / "run", seen, np.concatenate(labels), 2)


def test_group_field_needs_sample_groups() -> None:
    pytest.importorskip("transformers")
    from gatewatch.integrations.huggingface import GateWatchTrainerCallback

    with pytest.raises(ValueError, match="sample_groups"):
        GateWatchTrainerCallback(group_field="domain")
