"""PyTorch Lightning: :class:`GateWatchCallback` watches the gates of a LightningModule while ``fit`` runs.

::

    from gatewatch.integrations.lightning import GateWatchCallback

    class Module(L.LightningModule):
        def training_step(self, batch, batch_idx):
            losses = {"ctr": ..., "cvr": ...}
            return {"loss": sum(losses.values()), "task_losses": losses}

    L.Trainer(callbacks=[GateWatchCallback(tasks=["ctr", "cvr"])]).fit(Module())

* The watch is created in ``setup("fit")`` (after the process group exists, so only rank 0 writes) on
  the LightningModule, or on its submodule ``module="model"`` when the gates live there.
* Per-task losses: ``training_step`` returns ``{"loss": ..., "task_losses": {task: loss}}``, or sets
  ``self.task_losses = {...}`` (read, then reset to None). Lightning runs the backward itself, so the
  callback only records them (:meth:`GateWatch.log_losses`).
* ``watch.step()`` runs once per optimizer step: at the end of each batch after which
  ``trainer.global_step`` moved on (gradient accumulation and manual optimization included).
* Sample groups: ``GateWatchCallback(sample_groups=["code", "maths", "chat"], group_field="domain")`` reads
  each training batch's ``batch["domain"]`` (or ``batch.domain``) before its forward and hands it to
  :meth:`GateWatch.grouped`: an integer tensor ``[B]`` or ``[B, S]`` indexing the group names, ``-1`` for
  padding. The batch is not changed, so ``training_step`` sees the field too.
* Run directory: ``log_dir``, else ``<trainer.log_dir>/gatewatch`` (the logger's version folder). With a
  ``TensorBoardLogger``, gate scalars and histograms go into the logger's own TensorBoard run
  (tags ``gate/...``, ``expert/...``); otherwise into ``<run>/tensorboard``.
* The run is closed at the end of ``fit``, or marked crashed when ``fit`` raises.

Works with ``lightning`` (``import lightning.pytorch``) or the standalone ``pytorch_lightning`` package.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError:  # the standalone package
    try:
        import pytorch_lightning as pl
        from pytorch_lightning.loggers import TensorBoardLogger
    except ImportError as err:
        raise ImportError(
            "gatewatch.integrations.lightning needs PyTorch Lightning: pip install lightning "
            "(or pip install 'gatewatch[lightning]')."
        ) from err

from ..sinks.tensorboard import TensorBoardSink
from ..watch import GateWatch
from ._common import WatchSpec, batch_field, check_group_field, missing_losses_message, task_losses

__all__ = ["GateWatchCallback"]


class LoggerTensorBoard(TensorBoardSink):
    """Writes gatewatch's scalars and histograms through a SummaryWriter the trainer's logger owns (and closes)."""

    def __init__(self, writer: Any) -> None:
        self.shared = writer
        super().__init__(writer.get_logdir())

    def _open(self) -> Any:
        return self.shared

    def _drop_writer(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.flush()
        self.writer = None


class GateWatchCallback(pl.Callback):
    """Attach a :class:`~gatewatch.GateWatch` to the LightningModule for the duration of ``fit``.

    Args:
        tasks, gates, every, flush_every: as for :class:`~gatewatch.GateWatch`.
        module: dotted path of the submodule holding the gates (e.g. ``"model"``); default: the LightningModule.
        log_dir: the run directory; default ``<trainer.log_dir>/gatewatch``.
        group_field: the batch field holding each sample's group index (with ``sample_groups=[...]``).
        **watch_kwargs: any other :class:`~gatewatch.GateWatch` argument (``threshold``, ``config`` ...).
            ``tensorboard=False`` writes no TensorBoard events at all.
    """

    def __init__(
        self,
        *,
        tasks: Sequence[str] | None = None,
        gates: Mapping[str, Any] | Sequence[Any] | None = None,
        module: str | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        every: int = 10,
        flush_every: int = 100,
        group_field: str | None = None,
        **watch_kwargs: Any,
    ) -> None:
        super().__init__()
        self.group_field = check_group_field(type(self).__name__, group_field, watch_kwargs)
        self.spec = WatchSpec(type(self).__name__, tasks=tasks, gates=gates, module=module, log_dir=log_dir,
                              every=every, flush_every=flush_every, watch_kwargs=watch_kwargs)
        self.watch: GateWatch | None = None
        self._optimizer_steps = 0
        self._warned = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make the watch once the strategy has set the model up: after ``configure_model`` (FSDP2's
        ``fully_shard``, tensor parallelism) and the DDP wrapping, as for a watch made by hand."""
        if self.watch is not None and not self.watch.closed:
            return
        default_dir = Path(trainer.log_dir or trainer.default_root_dir) / "gatewatch"  # all ranks: it broadcasts
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        wants_tb = self.spec.watch_kwargs.get("tensorboard", True)
        extra: dict[str, Any] = {}
        if wants_tb and logger is not None:  # into the logger's own TensorBoard run (its writer exists on rank 0)
            mine = [LoggerTensorBoard(logger.experiment)] if trainer.global_rank == 0 else []
            extra = {"tensorboard": False, "sinks": [*self.spec.watch_kwargs.get("sinks", ()), *mine]}
        self.watch = self.spec.build(pl_module, default_dir, **extra)
        self._optimizer_steps = trainer.global_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.group_field is not None and self.watch is not None and not self.watch.closed:
            self.watch.grouped(batch_field(batch, self.group_field, type(self).__name__))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.watch is None or self.watch.closed:
            return
        losses = task_losses(outputs, pl_module)
        if losses is not None:
            self.watch.log_losses(losses)
        elif not self._warned:
            self._warned = True
            warnings.warn(missing_losses_message("training_step"), UserWarning, stacklevel=2)
        if trainer.global_step != self._optimizer_steps:
            self._optimizer_steps = trainer.global_step
            self.watch.step()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close(exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    def _close(self, error: BaseException | None = None) -> None:
        if self.watch is not None:
            self.watch.close(error=error)
