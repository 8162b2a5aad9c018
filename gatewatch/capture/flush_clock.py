"""When a watch flushes: every ``flush_every`` steps or ``flush_secs`` seconds, whichever comes first.

The clock is read on the host (``time.monotonic()``, no device sync). Under torch.distributed the ranks'
clocks disagree, so rank 0's decides: at each flush it proposes the step of the next one (from its step
time), the proposal travels in the flush's own collective, and every rank then flushes at that step. The
first flush under DDP comes at step ``FIRST_DISTRIBUTED_FLUSH`` (or ``flush_every`` if smaller), before
any step was timed.
"""

from __future__ import annotations

import math
import time

FIRST_DISTRIBUTED_FLUSH = 2


class FlushClock:
    """Decides at each step whether to flush (see the module docstring)."""

    def __init__(self, flush_every: int, flush_secs: float | None, *, distributed: bool) -> None:
        self.flush_every, self.flush_secs, self.distributed = flush_every, flush_secs, distributed
        self.last_time, self.last_step = time.monotonic(), 0
        self.step_time: float | None = None  # seconds per step over the last flush interval
        self.next_step = min(flush_every, FIRST_DISTRIBUTED_FLUSH) if distributed else 0

    def due(self, step: int) -> bool:
        """Should the watch flush after ``step``?"""
        if self.distributed:
            return step >= self.next_step
        if step - self.last_step >= self.flush_every:
            return True
        return self.flush_secs is not None and time.monotonic() - self.last_time >= self.flush_secs

    def propose(self, step: int) -> float:
        """Rank 0's choice of the step of the next flush, made at the flush after ``step``."""
        self._time(step)
        steps = self.flush_every
        if self.flush_secs is not None and self.step_time:
            steps = min(steps, max(1, math.floor(self.flush_secs / self.step_time)))
        return float(step + steps)

    def flushed(self, step: int, next_step: float | None = None) -> None:
        """A flush after ``step`` is done; under DDP ``next_step`` is the agreed step of the next one."""
        self._time(step)
        self.last_time, self.last_step = time.monotonic(), step
        if self.distributed and next_step:
            self.next_step = int(next_step)
        elif self.distributed:
            self.next_step = step + self.flush_every

    def _time(self, step: int) -> None:
        if step > self.last_step:
            self.step_time = (time.monotonic() - self.last_time) / (step - self.last_step)
