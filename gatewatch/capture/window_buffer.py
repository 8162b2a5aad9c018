"""Per-window sums, for every quantity that sums per window: hold, close, fold early past a cap, collect.

A quantity holds what it records (a gate output, a router pass, a call's losses) with :meth:`WindowBuffer.hold`:
a reference, no device op, labelled with the open window and the step being run. At a flush, or once more than
``hold_elements`` elements, ``step_calls`` items of one step or ``window_calls`` items of the open window are
held, every held item is *folded*: the quantity's ``reduce`` turns them into rows in one batched pass, and each
row goes into its window's slot of its key, as the key's declared reduction says (SUM adds, MIN and MAX keep the
extreme). :meth:`WindowBuffer.collect` hands over the closed windows' rows. Nothing here waits for the device:
slot indices go to the device pinned and non-blocking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .quantity import IDENTITY, CaptureContext, Quantity, Reduction, to_device

Slot = int  # a window's place among those not collected yet: 0, 1 ... the closed ones, then the open one
Fold = Callable[[list[tuple[Slot, int, Any]]], Iterable[tuple[str, list[Slot], torch.Tensor]]]
# (slot, step, item) of every held item -> (key, slot of each row, rows [len(slots), width]) to add in


class WindowBuffer:
    """The per-window sums of one quantity (see the module docstring).

    ``reduce`` folds held items into rows of the quantity's declared SUM/MIN/MAX keys; an item's step is never past
    its window's last step (what ran after the last ``step()`` joins the window ``close()`` closes). A key gets a
    state at every flush from its first row on (windows without rows hold the reduction's identity).
    """

    def __init__(self, quantity: Quantity, ctx: CaptureContext, reduce: Fold, *, hold_elements: int | None = None,
                 step_calls: int | None = None, window_calls: int | None = None) -> None:
        self.quantity, self.ctx, self.reduce = quantity, ctx, reduce
        self.hold_elements, self.step_calls, self.window_calls = hold_elements, step_calls, window_calls
        self.ends: list[int] = []  # last steps of the windows closed since the last collect
        self.sums: dict[str, torch.Tensor] = {}  # key -> [slots, width], the open window's slot included
        self.held: list[tuple[int, int, Any]] = []  # (window ordinal, step, item)
        self.held_elements = 0
        self.open_calls = 0  # items held in the open window
        self._window = 0  # ordinal of the open window
        self._first = 0  # ordinal of slot 0 (windows collected so far)
        self._step_calls = (0, 0)  # (step, items held in it)
        self._unfolded = 0  # items of the open window not folded yet

    def hold(self, item: Any, elements: int = 0) -> None:
        """Keep ``item`` until the next fold; ``elements``: what it holds, for the cap."""
        step = self.ctx.step + 1
        self.held.append((self._window, step, item))
        self.held_elements += elements
        self.open_calls += 1
        self._unfolded += 1
        calls = self._step_calls[1] + 1 if self._step_calls[0] == step else 1
        self._step_calls = (step, calls)
        if ((self.hold_elements is not None and self.held_elements > self.hold_elements)
                or (self.step_calls is not None and calls > self.step_calls)
                or (self.window_calls is not None and self._unfolded > self.window_calls)):
            self.fold()

    def on_window(self, step: int) -> None:
        """The window ending at ``step`` is closed."""
        self.ends.append(step)
        self._window += 1
        self.open_calls = self._unfolded = 0

    def fold(self) -> None:
        """Reduce every held item into its window's rows (one ``reduce`` call)."""
        held, self.held, self.held_elements, self._unfolded = self.held, [], 0, 0
        if not held:
            return
        items = []
        for window, step, item in held:
            slot = window - self._first
            items.append((slot, min(step, self.ends[slot]) if slot < len(self.ends) else step, item))
        for key, slots, rows in self.reduce(items):
            self._add(key, slots, rows)

    def _add(self, key: str, slots: list[Slot], rows: torch.Tensor) -> None:
        kind = self.quantity.states[key]
        rows = rows.reshape(len(slots), -1)
        self._ensure(key, max(slots) + 1, rows)
        sums = self.sums[key]
        at = to_device(slots, torch.int64, rows.device)
        if kind is Reduction.SUM:
            sums.index_add_(0, at, rows.to(sums.dtype))
        else:
            sums.scatter_reduce_(0, at[:, None].expand(rows.shape), rows.to(sums.dtype),
                                 "amin" if kind is Reduction.MIN else "amax")

    def _ensure(self, key: str, slots: int, like: torch.Tensor) -> None:
        """Room for ``slots`` windows in the rows of ``key``."""
        have = self.sums.get(key)
        if have is not None and have.shape[0] >= slots:
            return
        base = like if have is None else have
        fill = torch.full((slots - (0 if have is None else have.shape[0]), base.shape[1]),
                          IDENTITY[self.quantity.states[key]], dtype=base.dtype, device=base.device)
        self.sums[key] = fill if have is None else torch.cat([have, fill])

    def collect(self, n: int) -> dict[str, torch.Tensor]:
        """The rows of the first ``n`` closed windows of every key that has had rows; they leave the buffer."""
        self.fold()
        out: dict[str, torch.Tensor] = {}
        for key in list(self.sums):
            self._ensure(key, n + 1, self.sums[key])
            rows = self.sums[key]
            out[key] = rows[:n]
            self.sums[key] = torch.cat([rows[n:], torch.full_like(rows[:n], IDENTITY[self.quantity.states[key]])])
        self.ends = self.ends[n:]
        self._first += n
        return out

    def clear(self) -> None:
        """Drop what is held (at detach)."""
        self.held, self.held_elements, self._unfolded = [], 0, 0
