"""The one reducer of every quantity's declared state: gather, reduce across ranks, one transfer to the host.

At a flush, each quantity hands over its states (:class:`~gatewatch.capture.quantity.State`); the
reducer returns, per quantity, a host array for each key. In one process that is one concatenation
and one device-to-host transfer. Under torch.distributed:

* Each state's reduction is the one its quantity declared for its key (``Quantity.add_state``); :func:`combine`
  says what each reduction makes of the ranks' copies.
* SUM, MIN and MAX states are laid out in one agreed order (every quantity's ``slots``); a slot a rank
  has not filled yet (a gate it never ran) is filled with the reduction's identity. Until every slot's
  width is known on some rank, each flush first agrees on the widths (one tiny collective).
* The SUM buffer goes first, in one ``all_reduce``. It also carries the ``control`` values (rank 0's,
  such as the step of the next flush) and, per MIN/MAX kind, how many entries differ from the identity,
  so the MIN and MAX collectives run only when some rank holds such a value (a NaN's first step).
* REPLICATED states are rank 0's own; CONCAT states are gathered from every rank in rank order.
* A rank built with ``counts=False`` (a tensor-parallel rank other than the first, which sees the same tokens)
  takes part in every collective with the identity of each reduction and no CONCAT rows, so that each token is
  counted once.
* Built with ``varied=True`` (pipeline stages, which hold different gates), the ranks may hold different states:
  each flush first gathers every rank's layout (quantity, key, reduction, shape: one object all-gather), and the
  collectives above run over the union, a rank filling the slots it lacks with the identity. A REPLICATED state
  comes from its owner (the first rank that holds it and counts tokens), carried in the SUM buffer (the owner's
  values, zeros elsewhere), so it takes no collective of its own; CONCAT states are gathered by key over the union.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .distributed import agree_widths, others, steps_at_close, stragglers
from .quantity import IDENTITY, WINDOW_REDUCTIONS, Quantity, Reduction, State

HostStates = dict[str, dict[str, np.ndarray]]
OPS = {Reduction.SUM: "SUM", Reduction.MIN: "MIN", Reduction.MAX: "MAX"}


@dataclass
class Layout:
    """What one flush reduces: the window slots ``(quantity, key, reduction, width)`` in the agreed order, the
    REPLICATED states carried in the SUM buffer ``(quantity, key, this rank owns it, shape)``, and the CONCAT
    states ``(quantity, key)``."""

    slots: list[tuple[str, str, Reduction, int]]
    replicated: list[tuple[str, str, bool, tuple[int, ...]]]
    concat: list[tuple[str, str]]


class Reducer:
    """Reduces the states of ``quantities`` at each flush (see the module docstring)."""

    def __init__(self, quantities: list[Quantity], *, distributed: bool = False, group: object = None,
                 counts: bool = True, varied: bool = False) -> None:
        self.quantities = quantities
        self.distributed = distributed
        self.counts = counts  # this rank's windowed states count (False: it sees the same tokens as another)
        self.varied = varied  # the ranks may hold different states (pipeline stages): agree on the layout per flush
        self.group = group
        self.widths: dict[tuple[str, str], int] | None = None  # agreed once every slot is known on some rank
        self.degraded = ""  # why the ranks are no longer reduced together ('' while they are)
        self._told = False

    def reduce(self, windows: list[int], control: list[float] | None = None, *, local: bool = False
               ) -> tuple[HostStates, list[float]]:
        """Every quantity's states for the closed ``windows`` on the host, and the ``control`` values of rank 0.

        ``local``: this rank's states only, with no collective (every rank must agree to skip it: nothing
        windowed to reduce).
        """
        collected = self.collect(windows)
        control = list(control or [])
        if self.distributed and not local and not self.degraded:
            try:
                return self._reduce_across_ranks(collected, len(windows), control)
            except (RuntimeError, ValueError) as err:  # a rank crashed, left early or timed out
                if isinstance(err, ValueError) and "disagree" in str(err):
                    raise
                self.degrade(f"{others(self.group)} stopped answering gatewatch's flush collective "
                             f"({type(err).__name__}: {str(err)[:160]})")
        host = _to_host([(q, k, s.tensor) for q, states in collected.items() for k, s in states.items()])
        return host, control

    def collect(self, windows: list[int]) -> dict[str, dict[str, State]]:
        """Every quantity's device states for the closed ``windows``, each with its declared reduction."""
        return {q.name: {key: _declared(q, key, value) for key, value in q.collect(windows).items()}
                for q in self.quantities}

    def settle_close(self, step: int) -> None:
        """At close under DDP: wait (bounded) for every rank; go on alone when one is missing or stopped elsewhere."""
        if not self.distributed or self.degraded:
            return
        steps, why = steps_at_close(self.group, step)
        if steps is None or stragglers(steps):
            self.degrade(why or f"the ranks stopped at different steps: {stragglers(steps or [])}")

    def degrade(self, why: str) -> None:
        """From now on, reduce this rank's states alone (rank 0 writes its own windows)."""
        self.degraded = self.degraded or why

    def news(self, step: int) -> list[dict[str, Any]]:
        """Once, after the ranks fell apart: a warning, and the event marking the windows from ``step`` on as
        holding rank 0's data only."""
        if not self.degraded or self._told:
            return []
        self._told = True
        me, world = dist.get_rank(self.group), dist.get_world_size(self.group)  # type: ignore[arg-type]
        then = "it goes on writing its own windows" if me == 0 else "rank 0 writes its own windows"
        warnings.warn(f"gatewatch (rank {me}): {self.degraded}; {then}.", RuntimeWarning, stacklevel=3)
        return [{"step": step, "kind": "ranks_partial", "source": "ddp", "message": (
            f"{self.degraded}; the windows from step {step} on hold rank 0's data only (1 of {world} ranks).")}]

    # ---------------------------------------------------------------- several processes
    def _slot_widths(self, collected: dict[str, dict[str, State]]) -> dict[tuple[str, str], int]:
        """The width of every slot, agreed by all ranks (a collective until all are known)."""
        if self.widths is not None:
            return self.widths
        keys = [(q.name, k) for q in self.quantities for k in q.slots]
        local = [int(collected[q][k].tensor.shape[1]) if k in collected[q] else 0 for q, k in keys]
        high, low = agree_widths(local, self.group)
        differ = [f"{q}/{k}: {lo} vs {hi}" for (q, k), hi, lo in zip(keys, high, low, strict=True) if hi and hi != lo]
        if differ:
            raise ValueError(f"Ranks disagree on the size of the gatewatch state ({', '.join(differ)}): every rank "
                             "must run the same model (same experts per gate) and log the same task losses.")
        widths = dict(zip(keys, high, strict=True))
        if all(high):
            self.widths = widths
        return widths

    def _uniform_layout(self, collected: dict[str, dict[str, State]]) -> Layout:
        """The layout when every rank holds the same states: the declared slots with their agreed widths, each
        rank's REPLICATED states its own (rank 0's are written), its CONCAT states by key."""
        widths = self._slot_widths(collected)
        slots = [(q.name, key, kind, widths[(q.name, key)]) for q in self.quantities for key, kind in q.slots.items()]
        concat = [(q, k) for q, states in collected.items() for k, s in states.items()
                  if s.reduction is Reduction.CONCAT]
        return Layout(slots, [], concat)

    def _varied_layout(self, collected: dict[str, dict[str, State]]) -> Layout:
        """The union of every rank's states (one object all-gather): slots in order of first appearance with
        their widths, the owner of each REPLICATED state, and every CONCAT key."""
        me = dist.get_rank(self.group)  # type: ignore[arg-type]
        held = {(q, key): int(s.tensor.shape[1]) for q, states in collected.items() for key, s in states.items()
                if s.reduction in WINDOW_REDUCTIONS}
        mine = {"counts": self.counts,
                "slots": [(q.name, key, kind.value, held.get((q.name, key), 0)) for q in self.quantities
                          for key, kind in q.slots.items()],
                "states": [(q, key, s.reduction.value, tuple(s.tensor.shape)) for q, states in collected.items()
                           for key, s in states.items() if s.reduction not in WINDOW_REDUCTIONS]}
        every: list[Any] = [None] * dist.get_world_size(self.group)  # type: ignore[arg-type]
        dist.all_gather_object(every, mine, group=self.group)  # type: ignore[arg-type]
        widths: dict[tuple[str, str, str], set[int]] = {}
        for rank_layout in every:
            for q, key, kind, width in rank_layout["slots"]:
                widths.setdefault((q, key, kind), set()).update({width} if width else set())
        if differ := [f"{q}/{k}: {sorted(w)}" for (q, k, _), w in widths.items() if len(w) > 1]:
            raise ValueError(f"Ranks disagree on the size of the gatewatch state ({', '.join(differ)}): the stages "
                             "that hold a gate must agree on its experts, and every rank must log the same task "
                             "losses.")
        slots = [(q, key, Reduction(kind), max(w, default=0)) for (q, key, kind), w in widths.items()]
        owned: dict[tuple[str, str], tuple[int, tuple[int, ...]]] = {}
        concat: dict[tuple[str, str], None] = {}
        for counting in (True, False):  # the owner of a REPLICATED state: the first rank holding it that counts
            for rank, rank_layout in enumerate(every):
                for q, key, kind, shape in rank_layout["states"]:
                    if Reduction(kind) is Reduction.CONCAT:
                        concat[(q, key)] = None
                    elif rank_layout["counts"] == counting and (q, key) not in owned:
                        owned[(q, key)] = (rank, shape)
        replicated = [(q, key, rank == me, shape) for (q, key), (rank, shape) in owned.items()]
        return Layout(slots, replicated, list(concat))

    def _reduce_across_ranks(self, collected: dict[str, dict[str, State]], n_windows: int, control: list[float]
                             ) -> tuple[HostStates, list[float]]:
        plan = self._varied_layout(collected) if self.varied else self._uniform_layout(collected)
        device = next((s.tensor.device for states in collected.values() for s in states.values()),
                      torch.device("cpu"))  # built where the states are, then one copy per kind to the CPU (gloo)
        layout: dict[Reduction, list[tuple[str, str, int]]] = {kind: [] for kind in WINDOW_REDUCTIONS}
        parts: dict[Reduction, list[torch.Tensor]] = {kind: [] for kind in WINDOW_REDUCTIONS}
        for q, key, kind, width in plan.slots:
            if not width:
                continue
            state = collected.get(q, {}).get(key) if self.counts else None
            tensor = (state.tensor.to(device, torch.float64) if state is not None else
                      torch.full((n_windows, width), IDENTITY[kind], dtype=torch.float64, device=device))
            layout[kind].append((q, key, width))
            parts[kind].append(tensor.reshape(n_windows, width))
        buffers = {kind: (torch.cat(p, dim=1) if p else torch.zeros(n_windows, 0, dtype=torch.float64)).cpu()
                   for kind, p in parts.items()}
        extremes = [(buffers[k] != IDENTITY[k]).sum().to(torch.float64).reshape(1) for k in (Reduction.MIN,
                                                                                            Reduction.MAX)]
        head = torch.cat([torch.tensor(control, dtype=torch.float64), *extremes])
        owned = [collected[q][key].tensor.reshape(-1).to("cpu", torch.float64) if mine else
                 torch.zeros(math.prod(shape), dtype=torch.float64) for q, key, mine, shape in plan.replicated]
        summed = torch.cat([head, buffers[Reduction.SUM].reshape(-1), *owned])
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=self.group)  # type: ignore[arg-type]
        local = [] if self.varied else [(q, k, s.tensor) for q, states in collected.items() for k, s in states.items()
                                        if s.reduction is Reduction.REPLICATED]
        flat = torch.cat([summed.cpu(), *(t.reshape(-1).to("cpu", torch.float64) for _, _, t in local)])
        n = len(control)
        control_out, flags = flat[:n].tolist(), flat[n : n + 2].tolist()
        at = n + 2
        host: HostStates = {q.name: {} for q in self.quantities}
        sum_shape = buffers[Reduction.SUM].shape
        windowed = {Reduction.SUM: flat[at : at + buffers[Reduction.SUM].numel()].reshape(sum_shape).numpy()}
        at += buffers[Reduction.SUM].numel()
        for kind, flag in zip((Reduction.MIN, Reduction.MAX), flags, strict=True):
            windowed[kind] = self._extreme(buffers[kind], kind, flag > 0)
        for kind, entries in layout.items():
            col = 0
            for q, key, width in entries:
                host.setdefault(q, {})[key] = windowed[kind][:, col : col + width]
                col += width
        shaped = [(q, key, shape) for q, key, _, shape in plan.replicated] + [(q, k, t.shape) for q, k, t in local]
        for q, key, shape in shaped:
            host.setdefault(q, {})[key] = flat[at : at + math.prod(shape)].reshape(shape).numpy()
            at += math.prod(shape)
        for q, key in plan.concat:
            state = collected.get(q, {}).get(key)
            rows = self._gather(None if state is None else state.tensor if self.counts else state.tensor[:0])
            if rows is not None:
                host.setdefault(q, {})[key] = rows
        return host, control_out

    def _extreme(self, buffer: torch.Tensor, kind: Reduction, needed: bool) -> np.ndarray:
        """The MIN or MAX buffer reduced over ranks; no collective when every entry everywhere is the identity."""
        if needed and buffer.numel():
            buffer = buffer.contiguous()
            dist.all_reduce(buffer, op=getattr(dist.ReduceOp, OPS[kind]), group=self.group)  # type: ignore[arg-type]
        return buffer.cpu().numpy()

    def _gather(self, tensor: torch.Tensor | None) -> np.ndarray | None:
        """Rows of every rank, in rank order (``tensor`` None: this rank holds no such state; None when no rank
        has rows and this rank holds none)."""
        gathered: list[np.ndarray | None] = [None] * dist.get_world_size(self.group)  # type: ignore[arg-type]
        mine = None if tensor is None else tensor.detach().to("cpu", torch.float64).numpy()
        dist.all_gather_object(gathered, mine, group=self.group)  # type: ignore[arg-type]
        parts = [g for g in gathered if g is not None and g.size]
        return combine(Reduction.CONCAT, parts) if parts else mine


def combine(kind: Reduction, parts: list[np.ndarray]) -> np.ndarray:
    """What the reduction ``kind`` makes of the ranks' copies of one state, ``parts`` in rank order: the meaning of
    the collectives above, in one process."""
    if kind is Reduction.SUM:
        return np.sum(parts, axis=0)
    if kind is Reduction.MIN:
        return np.minimum.reduce(parts)
    if kind is Reduction.MAX:
        return np.maximum.reduce(parts)
    if kind is Reduction.CONCAT:
        return np.concatenate(parts, axis=0)
    return parts[0]  # REPLICATED: rank 0's


def _declared(q: Quantity, key: str, value: torch.Tensor | State) -> State:
    """``value`` with the reduction ``q`` declared for ``key``."""
    declared = q.states.get(key)
    if isinstance(value, State):
        if declared is not None and declared is not value.reduction:
            raise ValueError(f"Quantity {q.name!r} declared its state {key!r} as {declared.value} but collected it "
                             f"as {value.reduction.value}; declare it once (add_state) and return the bare tensor.")
        return value
    if declared is None:
        raise ValueError(f"Quantity {q.name!r} collected the state {key!r}, which it never declared: call "
                         f"self.add_state({key!r}, Reduction...) in its __init__.")
    return State(value, declared)


def _to_host(entries: list[tuple[str, str, torch.Tensor]]) -> HostStates:
    """Every tensor on the host, in one transfer."""
    host: HostStates = {}
    if not entries:
        return host
    device = entries[0][2].device
    flat = torch.cat([t.reshape(-1).to(device, torch.float64) for _, _, t in entries]).cpu().numpy()
    at = 0
    for q, key, tensor in entries:
        host.setdefault(q, {})[key] = flat[at : at + tensor.numel()].reshape(tensor.shape)
        at += tensor.numel()
    return host
