"""Hugging Face ``Trainer``: :class:`GateWatchTrainerCallback` watches the model's gates while ``train`` runs.

::

    from gatewatch.integrations.huggingface import GateWatchTrainerCallback

    class Model(nn.Module):
        def forward(self, x, labels):
            losses = {"ctr": ..., "cvr": ...}
            return {"loss": sum(losses.values()), "task_losses": losses}

    Trainer(model=Model(), args=args, train_dataset=data,
            callbacks=[GateWatchTrainerCallback(tasks=["ctr", "cvr"])]).train()

* The watch is created in ``on_train_begin`` on the model the Trainer trains (unwrapped), or on its
  submodule ``module="..."``.
* Per-task losses: the model's ``forward`` returns a dict (or ``ModelOutput``) with ``"loss"`` and
  ``"task_losses"``, or sets ``self.task_losses``; a forward hook on the model records them after
  every training forward (micro-batches of gradient accumulation included). The Trainer runs the backward.
* ``watch.step()`` runs in ``on_step_end``, once per optimizer step.
* Sample groups: ``GateWatchTrainerCallback(sample_groups=["code", "maths", "chat"], group_field="domain")``
  takes each training forward's ``domain`` input out of the model's inputs (so a model that does not take it
  is unaffected) and hands it to :meth:`GateWatch.grouped`: an integer tensor ``[B]`` or ``[B, S]`` indexing the
  group names, ``-1`` for padding. Keep the column in the batches with ``TrainingArguments(...,
  remove_unused_columns=False)`` (the Trainer drops columns the model's ``forward`` does not name).
* Run directory: ``log_dir``, else ``<args.output_dir>/gatewatch`` (with its own ``tensorboard/`` folder).
* The run is closed in ``on_train_end``. The Trainer has no event for a failed ``train()``: catch the
  error and call ``callback.close(error)`` to mark the run crashed (otherwise it reads as "cut off" once
  the process is gone).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as err:
    raise ImportError(
        "gatewatch.integrations.huggingface needs the transformers package: pip install transformers."
    ) from err

from torch import nn
from torch.utils.hooks import RemovableHandle

from ..watch import GateWatch
from ._common import WatchSpec, batch_field, check_group_field, missing_losses_message, task_losses

__all__ = ["GateWatchTrainerCallback"]


class GateWatchTrainerCallback(TrainerCallback):
    """Attach a :class:`~gatewatch.GateWatch` to the model of a Hugging Face ``Trainer`` during ``train()``.

    Args:
        tasks, gates, every, flush_every: as for :class:`~gatewatch.GateWatch`.
        module: dotted path of the submodule holding the gates; default: the model.
        log_dir: the run directory; default ``<args.output_dir>/gatewatch``.
        group_field: the model input holding each sample's group index (with ``sample_groups=[...]``); it is
            taken out of the inputs before the forward.
        **watch_kwargs: any other :class:`~gatewatch.GateWatch` argument.
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
        self.group_field = check_group_field(type(self).__name__, group_field, watch_kwargs)
        self.spec = WatchSpec(type(self).__name__, tasks=tasks, gates=gates, module=module, log_dir=log_dir,
                              every=every, flush_every=flush_every, watch_kwargs=watch_kwargs)
        self.watch: GateWatch | None = None
        self._handle: RemovableHandle | None = None
        self._groups_handle: RemovableHandle | None = None
        self._warned = False

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if model is None:
            raise ValueError("GateWatchTrainerCallback needs the model: use it as Trainer(callbacks=[...]).")
        self.close()
        self.watch = self.spec.build(model, Path(args.output_dir) / "gatewatch")
        self._handle = model.register_forward_hook(self._record_losses)
        if self.group_field is not None:
            self._groups_handle = model.register_forward_pre_hook(self._take_groups, with_kwargs=True)

    def _take_groups(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                     ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Hand the batch's group labels to the watch and take them out of the forward's inputs."""
        assert self.group_field is not None
        if self.watch is None or self.watch.closed:
            return args, kwargs
        if module.training:  # an evaluation batch may lack the field
            self.watch.grouped(batch_field(kwargs, self.group_field, type(self).__name__))
        return args, {k: v for k, v in kwargs.items() if k != self.group_field}

    def _record_losses(self, module: nn.Module, _inputs: Any, output: Any) -> None:
        if not module.training or self.watch is None or self.watch.closed:
            return
        losses = task_losses(output, module)
        if losses is not None:
            self.watch.log_losses(losses)
        elif not self._warned:
            self._warned = True
            warnings.warn(missing_losses_message("the model's forward"), UserWarning, stacklevel=2)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watch is not None and not self.watch.closed:
            self.watch.step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self, error: BaseException | None = None) -> None:
        """Write what is left and end the run (marked crashed when ``error`` is given); remove the loss hook."""
        for handle in (self._handle, self._groups_handle):
            if handle is not None:
                handle.remove()
        self._handle = self._groups_handle = None
        if self.watch is not None:
            self.watch.close(error=error)
