"""The capture half of a quantity: what the watch asks of each measurement.

A quantity attaches its own hooks when it is built, keeps its state on the model's device, and
declares every state tensor with its reduction (:class:`Reduction`). It never transfers, reduces or
relays out its own state: at a flush the watch's :class:`~gatewatch.capture.reducer.Reducer` gathers
the states of every quantity, reduces them across ranks (one collective per reduction kind) and
moves them to the host in one transfer; then each quantity turns its host copy into rows of its
tables (``gatewatch.quantities.<name>.read.TABLES`` names their columns).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..gating.specs import ResolvedGate


class Reduction(str, Enum):
    """How a state combines across ranks (DDP) at a flush."""

    SUM = "sum"  # window sums: added up over ranks
    MIN = "min"  # e.g. the first step a NaN appeared
    MAX = "max"
    CONCAT = "concat"  # rows of every rank, appended in rank order
    REPLICATED = "replicated"  # equal on every rank (an expert-bias buffer), or rank 0's own figure: never combined


IDENTITY = {Reduction.SUM: 0.0, Reduction.MIN: float("inf"), Reduction.MAX: float("-inf")}


@dataclass
class State:
    """One state tensor at a flush: ``[rows, width]``.

    SUM, MIN and MAX states hold one row per window closed since the last flush, and every rank declares
    the same keys for them (:attr:`Quantity.slots`); CONCAT and REPLICATED states hold any number of rows
    (one per measurement, say), which the quantity keeps track of itself.
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
    step: int = 0  # optimizer steps completed
    loss_tasks: list[str] | None = None  # task names of the logged losses, once known


Rows = dict[str, pd.DataFrame | list[dict[str, Any]]]


class Quantity:
    """Base class of the capture halves; every method has a default that does nothing.

    The watch calls, in this order: :meth:`on_step` after each optimizer step, :meth:`on_window` when a
    statistics window closes, and at a flush :meth:`collect` then :meth:`rows`. :meth:`detach` removes
    the hooks at close.
    """

    name = ""
    slots: Mapping[str, Reduction] = MappingProxyType({})  # keys of the per-window SUM/MIN/MAX states, the same
    # on every rank

    def on_step(self, step: int) -> None:
        """Optimizer step ``step`` (counting from 1) is done."""

    def on_window(self, step: int) -> None:
        """The window ending at ``step`` is closed."""

    def collect(self, windows: list[int]) -> dict[str, State]:
        """The device states of the windows closed since the last flush (``windows``: their last steps)."""
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

    def detach(self) -> None:
        """Remove every hook."""


def to_device(values: list[float] | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor; on CUDA the copy is pinned and non-blocking (no host sync)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
