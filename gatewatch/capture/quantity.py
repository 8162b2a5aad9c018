"""The capture half of a quantity: what the watch asks of each measurement, and the bookkeeping it gets for free.

A quantity listens to modules through :meth:`Quantity.hook` / :meth:`Quantity.hook_gate` when it is built (one
PyTorch hook per module for all quantities, :mod:`gatewatch.capture.gate_hooks`; :meth:`Quantity.detach` removes
them), keeps its state on the model's device, and declares every state tensor once with its reduction
(:meth:`Quantity.add_state`). It never transfers, reduces or relays out its own state: at a flush the watch's
:class:`~gatewatch.capture.reducer.Reducer` gathers the states of every quantity, reduces them across ranks
(one collective per reduction kind) and moves them to the host in one transfer; then each quantity turns its
host copy into rows of its tables (``gatewatch.quantities.<name>.read.TABLES`` names their columns). A quantity
that sums per window keeps its sums in a :class:`~gatewatch.capture.window_buffer.WindowBuffer`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..gating.specs import ResolvedGate
from .gate_hooks import HookCall, Listening, listen


class Reduction(str, Enum):
    """How a state combines across ranks (DDP) at a flush."""

    SUM = "sum"  # window sums: added up over ranks
    MIN = "min"  # e.g. the first step a NaN appeared
    MAX = "max"
    CONCAT = "concat"  # rows of every rank, appended in rank order
    REPLICATED = "replicated"  # equal on every rank (an expert-bias buffer), or rank 0's own figure: never combined


IDENTITY = {Reduction.SUM: 0.0, Reduction.MIN: float("inf"), Reduction.MAX: float("-inf")}


WINDOW_REDUCTIONS = (Reduction.SUM, Reduction.MIN, Reduction.MAX)


@dataclass
class State:
    """One state tensor at a flush, ``[rows, width]``, with the reduction its quantity declared for its key.

    SUM, MIN and MAX states hold one row per window closed since the last flush, and every rank declares
    the same keys for them (:attr:`Quantity.slots`); CONCAT and REPLICATED states hold any number of rows
    (one per measurement, say), which the quantity keeps track of itself. (:meth:`Quantity.collect` returns
    the bare tensors; a ``State`` there is still accepted.)
    """

    tensor: torch.Tensor
    reduction: Reduction


@dataclass
class CaptureContext:
    """What every quantity may read: the model, the resolved gates, the watch's settings and the step."""

    model: nn.Module
    tasks: list[str] | None
    gates: list[ResolvedGate]
    every: int
    threshold: float
    bins: int
    margin: float
    distributed: bool
    options: dict[str, Any] = field(default_factory=dict)  # the quantities' own keywords of GateWatch(...)
    mesh: Any = None  # GateWatch(mesh=...): the DeviceMesh whose named dimensions say which ranks share tokens
    step: int = 0  # optimizer steps completed
    loss_tasks: list[str] | None = None  # task names of the logged losses, once known
    closing: bool = False  # set by close() before its last flush: the windows it collects are the run's last


Rows = dict[str, pd.DataFrame | list[dict[str, Any]]]
LossItems = list[tuple[str, torch.Tensor]]  # (task, loss) in task order


class Quantity:
    """Base class of the capture halves; every method has a default that does nothing.

    The watch calls, in this order: :meth:`on_batch` at ``watch.batch(...)``, :meth:`on_losses` and
    :meth:`around_backward` when losses are logged, :meth:`on_step` after each optimizer step, :meth:`on_window`
    when a statistics window closes, and at a flush :meth:`collect` then :meth:`rows`. :meth:`detach` removes
    the hooks at close.
    """

    name = ""
    batch_keys: tuple[str, ...] = ()  # the keywords of ``watch.batch(...)`` this quantity reads (:meth:`on_batch`)

    # ------------------------------------------------------------------ declarations and hooks
    def add_state(self, key: str, reduction: Reduction) -> None:
        """Declare the state ``key`` and how it combines across ranks, once (in ``__init__``). SUM, MIN and MAX
        states must be declared with the same keys on every rank (e.g. one per gate)."""
        states = vars(self).setdefault("_declared", {})
        if key in states:
            raise ValueError(f"Quantity {self.name!r} declares its state {key!r} twice; declare each key once.")
        states[key] = Reduction(reduction)

    @property
    def states(self) -> Mapping[str, Reduction]:
        """Every declared state and its reduction."""
        return MappingProxyType(vars(self).get("_declared", {}))

    @property
    def slots(self) -> Mapping[str, Reduction]:
        """The declared per-window states (SUM, MIN, MAX): the same keys on every rank."""
        return MappingProxyType({k: r for k, r in self.states.items() if r in WINDOW_REDUCTIONS})

    def hook(self, module: nn.Module, fn: Callable[[HookCall], None], *, pre: bool = False) -> Listening:
        """Call ``fn(call)`` after each training forward of ``module`` (``pre=True``: before it), except a forward
        recomputed by activation checkpointing. All quantities share one PyTorch hook per module; :meth:`detach`
        removes this one."""
        handle = listen(module, fn, pre=pre)
        vars(self).setdefault("_listening", []).append(handle)
        return handle

    def hook_gate(self, gate: ResolvedGate, fn: Callable[[HookCall], None]) -> Listening:
        """:meth:`hook` on a gate's module: ``call.output`` is its raw output (a router's tuple, say) and
        ``call.probs(gate)`` its probabilities, computed once for every quantity."""
        return self.hook(gate.module, fn)

    def detach(self) -> None:
        """Remove every hook added through :meth:`hook`."""
        for handle in vars(self).pop("_listening", []):
            handle.remove()

    # ------------------------------------------------------------------ what the loop hands over
    def on_batch(self, inputs: Mapping[str, Any]) -> None:
        """``watch.batch(...)`` was called: ``inputs`` holds the keywords of :attr:`batch_keys` it was given. They
        stand until the next call (a forward recomputed during the backward belongs to the same batch)."""

    def on_losses(self, items: LossItems, step: int) -> None:
        """The task losses of a call to ``watch.log_losses`` / ``backward`` / ``task_gradients`` (``step``: the
        optimizer step they belong to, counting from 1)."""

    def backward_due(self, step: int) -> bool:
        """True when this quantity measures something around the backward of ``step``."""
        return False

    def around_backward(self, items: LossItems, total: torch.Tensor, step: int) -> AbstractContextManager[Any]:
        """A context around the backward of ``total`` (the sum of ``items``), run inside it."""
        return nullcontext()

    def late(self) -> bool:
        """True when something recorded after the last window closed must be written at close: close() then
        closes one more window."""
        return False

    # ------------------------------------------------------------------ schedule and flush
    def on_close(self) -> None:
        """``close()`` has begun: the flush that follows is the run's last."""

    def on_step(self, step: int) -> None:
        """Optimizer step ``step`` (counting from 1) is done."""

    def on_window(self, step: int) -> None:
        """The window ending at ``step`` is closed."""

    def collect(self, windows: list[int]) -> dict[str, torch.Tensor | State]:
        """The device states of the windows closed since the last flush (``windows``: their last steps), by
        declared key (:meth:`add_state`); a key with nothing to report is left out."""
        return {}

    def rows(self, windows: list[int], host: dict[str, np.ndarray]) -> Rows:
        """Rows of this quantity's tables from the host copy of :meth:`collect`'s states (reduced over ranks).

        ``host`` may hold slots this rank never filled: their width then comes from another rank.
        """
        return {}

    def after(self, tables: dict[str, pd.DataFrame]) -> Rows:
        """Rows made from every quantity's rows of this flush (reduced, so equal on every rank), e.g. decisions
        taken on them (the guard)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """This quantity's fields of run.json."""
        return {}


def to_device(values: list[float] | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor; on CUDA the copy is pinned and non-blocking (no host sync)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
