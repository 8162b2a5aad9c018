"""Stale gradients: simulate asynchronous data-parallel training (a parameter server) in one process.

With staleness ``tau``, step t computes its gradient on the parameters the model had at step
``t - d`` (``d = tau`` for ``"fixed"`` delays, ``d`` uniform on ``0..tau`` for ``"random"`` delays, as workers
finish at different times) on the batch of step t, and the optimizer applies it to the parameters of step t.
Steps before ``d`` use the initial parameters (the delay is clamped at step 0).

What it is: one process, exact staleness (the delay of every update is known), one update per step, the
same optimizer state as plain training. What it is not: no real network, no workers racing each other, no
lost or reordered updates, no partial (per-shard) staleness; only parameters are delayed, buffers (e.g.
batch-norm statistics) are the current ones. The forward pass of step t runs on the stale parameters, so the
gates, losses and gradients GateWatch records at step t are those of the stale forward pass.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..validate import non_negative_int

DELAYS = ("fixed", "random")


class Staleness:
    """Keeps the last ``tau + 1`` parameter snapshots of ``model`` and runs forward passes on old ones.

    Per step: ``with staleness.stale(): loss = ...; loss.backward()`` then ``optimizer.step()``. Inside the
    block the model holds the parameters of ``delay`` steps ago; on leaving it the current parameters are
    restored (the gradients stay in ``.grad``). ``delays`` lists the delay of every step so far.
    """

    def __init__(self, model: nn.Module, tau: int, delay: str = "fixed", seed: int = 0) -> None:
        self.tau = non_negative_int("staleness", tau, unit="steps")
        if delay not in DELAYS:
            raise ValueError(f"unknown staleness delay {delay!r}; choose one of {list(DELAYS)}.")
        self.delay = delay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.snapshots: deque[list[Tensor]] = deque()  # oldest first; the last one is the current step's
        self.rng = random.Random(seed)
        self.delays: list[int] = []

    def next_delay(self) -> int:
        """The delay of the coming step: ``tau``, or uniform on ``0..tau``, clamped to the steps taken so far."""
        d = self.tau if self.delay == "fixed" else self.rng.randint(0, self.tau)
        return min(d, len(self.snapshots) - 1)

    def _snapshot(self) -> None:
        reuse = self.snapshots.popleft() if len(self.snapshots) > self.tau else None
        with torch.no_grad():
            if reuse is None:
                self.snapshots.append([p.detach().clone() for p in self.params])
            else:
                for buf, p in zip(reuse, self.params, strict=True):
                    buf.copy_(p)
                self.snapshots.append(reuse)

    def _load(self, tensors: list[Tensor]) -> None:
        with torch.no_grad():
            for p, value in zip(self.params, tensors, strict=True):
                p.copy_(value)

    @contextmanager
    def stale(self) -> Iterator[int]:
        """Run the block on the parameters of ``delay`` steps ago (yields the delay), then restore the current."""
        self._snapshot()
        d = self.next_delay()
        self.delays.append(d)
        if d == 0:
            yield 0
            return
        self._load(self.snapshots[-1 - d])
        try:
            yield d
        finally:
            self._load(self.snapshots[-1])
