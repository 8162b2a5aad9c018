"""torch.distributed as the watch uses it: rank, world size, gatewatch's own gloo group, and the close protocol.

All of gatewatch's collectives run in its own gloo group (CPU tensors), created when the watch is: a rank
that crashed or stopped early makes a flush's collective fail after ``FLUSH_TIMEOUT_S`` (or at once, when
its process is gone), and the watch then goes on with rank 0's own windows. ``close()`` first waits at most
``CLOSE_TIMEOUT_S`` for every rank and compares their step counts, so that it never waits forever.
"""

from __future__ import annotations

import re
from datetime import timedelta

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def agree_widths(widths: list[int], group: object = None) -> tuple[list[int], list[int]]:
    """Largest and smallest positive value of each width over all ranks (0 = unknown), in one collective."""
    big = 2**62
    local = torch.tensor([*widths] + [-(w if w > 0 else big) for w in widths], dtype=torch.int64,
                         device="cpu")
    dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)  # type: ignore[arg-type]
    values = local.cpu().tolist()
    n = len(widths)
    return values[:n], [0 if -v == big else -v for v in values[n:]]


FLUSH_TIMEOUT_S = 300.0  # a flush's collective waits this long for the other ranks, then rank 0 goes on alone
CLOSE_TIMEOUT_S = 30.0  # close() waits this long for every rank to reach it


def own_group(ranks: list[int] | None = None) -> object:
    """A gloo group of gatewatch's own over ``ranks`` (None: every rank), with a timeout: a rank that never comes
    fails gatewatch's collective, not the user's (a timed-out default group would break the training's own
    collectives). Every rank must call it, in the same order, whether or not it is in ``ranks``."""
    return dist.new_group(ranks=ranks, backend="gloo", timeout=timedelta(seconds=FLUSH_TIMEOUT_S))


def own_copy(group: object) -> object:
    """gatewatch's own gloo group (:func:`own_group`) over the ranks of this rank's ``group`` (None: every rank).
    When ``group`` is one of several disjoint subgroups (the data-parallel groups of a mesh), every rank learns
    the others' groups (one object gather) and takes part in creating each, in the same order."""
    every_rank = own_group()
    if group is None or dist.get_world_size(group) == dist.get_world_size():  # type: ignore[arg-type]
        return every_rank
    mine = dist.get_process_group_ranks(group)  # type: ignore[arg-type]
    groups: list[list[int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(groups, sorted(mine), group=every_rank)  # type: ignore[arg-type]
    own = every_rank
    for ranks in sorted({tuple(g) for g in groups if g is not None}):
        created = own_group(list(ranks))
        if dist.get_rank() in ranks:
            own = created
    return own


def steps_at_close(group: object, step: int, timeout: float | None = None) -> tuple[list[int] | None, str]:
    """Every rank's step count at close, or None and why when some rank did not come within ``timeout``
    (default ``CLOSE_TIMEOUT_S``)."""
    timeout = CLOSE_TIMEOUT_S if timeout is None else timeout
    try:
        dist.monitored_barrier(group=group, timeout=timedelta(seconds=timeout), wait_all_ranks=True)  # type: ignore
        steps: list[int | None] = [None] * dist.get_world_size(group)  # type: ignore[arg-type]
        dist.all_gather_object(steps, step, group=group)  # type: ignore[arg-type]
    except RuntimeError as err:
        missing = re.search(r"[Rr]anks? ([\d, ]+) failed", str(err)) or re.search(r"from rank (\d+)", str(err))
        who = f"rank(s) {missing[1].strip()}" if missing else others(group)
        return None, f"{who} did not reach close() within {timeout:.0f} s ({type(err).__name__})"
    return [int(s or 0) for s in steps], ""


def others(group: object) -> str:
    """The ranks other than this one, in words."""
    me, world = dist.get_rank(group), dist.get_world_size(group)  # type: ignore[arg-type]
    ranks = [r for r in range(world) if r != me]
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"one of ranks {ranks}"


def stragglers(steps: list[int]) -> str:
    """Which ranks stopped at another step than rank 0, in words ('' when all agree)."""
    odd = [f"rank {r} at step {s}" for r, s in enumerate(steps) if s != steps[0]]
    return f"{', '.join(odd)} (rank 0 at step {steps[0]})" if odd else ""
