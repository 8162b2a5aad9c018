"""The framework callbacks under DDP: 2 gloo ranks on the CPU, launched as torchrun would launch them.

Each rank is a fresh interpreter with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` set (:mod:`_distributed`), so Lightning and the Hugging Face Trainer join the process
group instead of spawning workers. Each rank trains the tiny MMoE of the single-process integration
tests (``test_lightning``, ``test_huggingface``) for 12 optimizer steps on its own shard of the data,
with ``every=2, flush_every=4``, and saves the size and the task losses of every batch it trained on.
Every rank is given its own ``log_dir`` (``runs/rank<r>``), so that a folder written by rank 1 would show.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _distributed import launch

import gatewatch as gw

TASKS = ["ctr", "like"]
STEPS, EVERY, FLUSH_EVERY, WORLD = 12, 2, 4, 2
LIGHTNING_N, HF_N = 16, 8  # per-rank batch sizes


def _rank_setup(root: str) -> tuple[int, Path]:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|TensorBoard|tensorboardX).*")
    return int(os.environ["RANK"]), Path(root)


def _save(root: Path, kind: str, rank: int, sizes: list[int], logged: list[dict[str, float]]) -> None:
    (root / f"{kind}-rank{rank}.json").write_text(json.dumps({"sizes": sizes, "logged": logged}))


# ---------------------------------------------------------------------------------------------- Lightning
def lightning_worker(root: str) -> None:
    rank, out = _rank_setup(root)
    import lightning.pytorch as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.strategies import DDPStrategy
    from test_lightning import MultiTask

    from gatewatch.integrations.lightning import GateWatchCallback

    class Recording(MultiTask):
        def __init__(self) -> None:
            super().__init__("dict")
            self.sizes: list[int] = []

        def training_step(self, data: list[torch.Tensor], batch_idx: int) -> object:
            self.sizes.append(len(data[0]))
            return super().training_step(data, batch_idx)

    module = Recording()
    callback = GateWatchCallback(tasks=TASKS, every=EVERY, flush_every=FLUSH_EVERY,
                                 log_dir=out / "runs" / f"rank{rank}")
    trainer = L.Trainer(accelerator="cpu", devices=WORLD, num_nodes=1,
                        strategy=DDPStrategy(process_group_backend="gloo"), max_steps=STEPS,
                        default_root_dir=out / "lightning", logger=TensorBoardLogger(out / "lightning", name="tb"),
                        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1)
    assert trainer.world_size == WORLD and trainer.global_rank == rank  # joined, not spawned
    trainer.fit(module)
    assert callback.watch is not None and callback.watch.closed and callback.watch.ctx.distributed
    _save(out, "lightning", rank, module.sizes, module.logged)


def lightning_fsdp2_worker(root: str) -> None:
    """Lightning's FSDP2 strategy (``ModelParallelStrategy``): each expert and the whole MMoE ``fully_shard``-ed in
    ``configure_model`` over the strategy's data-parallel mesh, the watch made by the callback afterwards."""
    rank, out = _rank_setup(root)
    import lightning.pytorch as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from test_lightning import MultiTask
    from torch.distributed.fsdp import fully_shard

    from gatewatch.integrations.lightning import GateWatchCallback

    class Sharded(MultiTask):
        def __init__(self) -> None:
            super().__init__("dict")
            self.sizes: list[int] = []

        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            for expert in self.model.experts:
                fully_shard(expert, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
            self.sharded_before_the_watch = callback.watch is None

        def training_step(self, data: list[torch.Tensor], batch_idx: int) -> object:
            self.sizes.append(len(data[0]))
            return super().training_step(data, batch_idx)

    module = Sharded()
    callback = GateWatchCallback(tasks=TASKS, every=EVERY, flush_every=FLUSH_EVERY, tensorboard=False,
                                 log_dir=out / "runs" / f"rank{rank}")
    strategy = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1, process_group_backend="gloo")
    trainer = L.Trainer(accelerator="cpu", devices=WORLD, num_nodes=1, strategy=strategy, max_steps=STEPS,
                        default_root_dir=out / "lightning", logger=False, callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    assert trainer.world_size == WORLD and trainer.global_rank == rank
    trainer.fit(module)
    from torch.distributed.tensor import DTensor
    assert isinstance(next(module.model.experts[0].parameters()), DTensor)  # the experts were sharded
    assert module.sharded_before_the_watch  # the callback made its watch on the sharded model
    assert callback.watch is not None and callback.watch.closed and callback.watch.ctx.distributed
    _save(out, "lightning-fsdp2", rank, module.sizes, module.logged)


# ---------------------------------------------------------------------------------------------- Hugging Face
def huggingface_worker(root: str) -> None:
    rank, out = _rank_setup(root)
    from conftest import batch
    from test_huggingface import MultiTask
    from transformers import Trainer, TrainingArguments

    from gatewatch.integrations.huggingface import GateWatchTrainerCallback

    class Recording(MultiTask):
        def __init__(self) -> None:
            super().__init__("dict")
            self.sizes: list[int] = []

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, object]:
            if self.training:
                self.sizes.append(len(x))
            return super().forward(x, labels)

    model = Recording()
    # 12 steps of both ranks in one epoch: STEPS * WORLD batches of HF_N samples
    data = [{"x": x, "labels": y} for i in range(STEPS * WORLD) for x, y in zip(*batch(i, n=HF_N), strict=True)]
    arguments = TrainingArguments(output_dir=str(out / "hf"), per_device_train_batch_size=HF_N, learning_rate=1e-2,
                                  max_steps=STEPS, report_to="none", save_strategy="no", logging_strategy="no",
                                  use_cpu=True, ddp_backend="gloo", ddp_find_unused_parameters=False, disable_tqdm=True,
                                  dataloader_num_workers=0)
    callback = GateWatchTrainerCallback(tasks=TASKS, module="net", every=EVERY, flush_every=FLUSH_EVERY,
                                        log_dir=out / "runs" / f"rank{rank}")
    trainer = Trainer(model=model, args=arguments, train_dataset=data, callbacks=[callback])
    assert arguments.world_size == WORLD and arguments.process_index == rank  # joined, not a single process
    trainer.train()
    assert callback.watch is not None and callback.watch.closed and callback.watch.ctx.distributed
    _save(out, "hf", rank, model.sizes, model.logged)


# ---------------------------------------------------------------------------------------------- checks
def check_run(root: Path, kind: str, n: int) -> None:
    """The run rank 0 wrote holds every window once, with both ranks' samples and losses, and rank 1 wrote none."""
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["rank0"]  # rank 1 created no folder at all
    run = gw.load_run(root / "runs" / "rank0")
    assert run.status == "finished" and run.problems == [] and run.steps == STEPS
    assert run.meta["world_size"] == WORLD
    windows = list(range(EVERY, STEPS + 1, EVERY))

    gates = run.gates
    assert not gates.duplicated(["step", "gate"]).any()
    assert sorted(set(gates["gate"])) == TASKS
    for gate in TASKS:
        assert gates[gates["gate"] == gate]["step"].tolist() == windows

    ranks = [json.loads((root / f"{kind}-rank{r}.json").read_text()) for r in range(WORLD)]
    assert [len(r["sizes"]) for r in ranks] == [STEPS] * WORLD  # one batch per rank per optimizer step
    per_window = {w: sum(sum(r["sizes"][w - EVERY : w]) for r in ranks) for w in windows}
    assert set(per_window.values()) == {WORLD * n * EVERY}
    for row in gates.itertuples():
        assert row.samples == per_window[row.step], (row.gate, row.step)

    losses = run.losses
    assert not losses.duplicated(["step", "task"]).any()
    assert sorted(set(losses["task"])) == TASKS
    for task in TASKS:
        assert losses[losses["task"] == task]["step"].tolist() == windows
    for row in losses.itertuples():  # the mean over both ranks' batches of the window
        want = np.mean([b[row.task] for r in ranks for b in r["logged"][row.step - EVERY : row.step]])
        assert row.loss == pytest.approx(want, rel=1e-5), (row.task, row.step)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_lightning_ddp_two_gloo_ranks(tmp_path: Path) -> None:
    pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning is an optional dependency")
    launch("test_integrations_ddp", "lightning_worker", tmp_path, world=WORLD, timeout=120)
    check_run(tmp_path, "lightning", LIGHTNING_N)
    # the gate scalars went into the logger's TensorBoard run, which only rank 0 has
    assert not (tmp_path / "runs" / "rank0" / "tensorboard").exists()
    assert len(list((tmp_path / "lightning" / "tb").glob("version_*/events.out.tfevents.*"))) == 1


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_lightning_fsdp2_model_parallel_strategy_two_gloo_ranks(tmp_path: Path) -> None:
    pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning is an optional dependency")
    launch("test_integrations_ddp", "lightning_fsdp2_worker", tmp_path, world=WORLD, timeout=120)
    check_run(tmp_path, "lightning-fsdp2", LIGHTNING_N)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_huggingface_trainer_ddp_two_gloo_ranks(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="transformers is an optional dependency")
    launch("test_integrations_ddp", "huggingface_worker", tmp_path, world=WORLD, timeout=120)
    check_run(tmp_path, "hf", HF_N)
    assert len(list((tmp_path / "runs" / "rank0" / "tensorboard").glob("events.out.tfevents.*"))) == 1
