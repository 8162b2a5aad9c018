"""Window sums of every gate, kept on the model's device and updated without host synchronisation.

Gates with the same number of experts (and top-k) share one state tensor ``[G, Layout.size]`` in
float64; gate outputs of one step with the same shape are stacked and reduced in one pass, so the
per-step cost depends on the number of distinct gate shapes, not on the number of gates. A window
ends with :meth:`GateAccumulator.snapshot`, which copies the state into one flat device tensor (no
transfer) and zeroes it; :func:`to_host` moves any number of snapshots to the host in one transfer.
Under torch.distributed, :func:`relayout` and :func:`reduce_windows` add the windows of all ranks up
at a flush (see the section at the end of this module).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .functional import NO_STEP, Layout, window_sums


@dataclass
class Group:
    """The state of the gates that share one expert count and top-k."""

    layout: Layout
    top_k: int | None
    gate_ids: list[int]
    sums: torch.Tensor  # [G, layout.size] float64
    first_bad: torch.Tensor  # [G] float64: first step with a non-finite output, NO_STEP if none


@dataclass
class Snapshot:
    """One closed window on the device: its last step, gate layout and flat sums."""

    step: int
    layout: list[tuple[int, Layout]]  # (gate id, layout) in the order of ``flat``
    flat: torch.Tensor  # sums of each gate, then first_bad of each gate, then the loss sums


class GateAccumulator:
    """Per-window sums of all gates (see the module docstring)."""

    def __init__(self, top_k: list[int | None], *, threshold: float, bins: int, margin: float) -> None:
        self.top_k = top_k
        self.threshold, self.bins, self.margin = threshold, bins, margin
        self.groups: dict[tuple[int, int | None], Group] = {}
        self.where: dict[int, tuple[tuple[int, int | None], int]] = {}  # gate id -> (group key, row)
        self._steps: tuple[torch.Tensor, torch.Tensor] | None = None
        self._on_device_cache: dict[tuple[tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = {}
        self._last_step: int | None = None

    def _ensure(self, gate_id: int, experts: int, like: torch.Tensor) -> tuple[int, int | None]:
        key = (experts, self.top_k[gate_id])
        if gate_id in self.where:
            return self.where[gate_id][0]
        layout = Layout(experts, self.bins)
        group = self.groups.get(key)
        zeros = torch.zeros(1, layout.size, dtype=torch.float64, device=like.device)
        none = torch.full((1,), float(NO_STEP), dtype=torch.float64, device=like.device)
        if group is None:
            self.groups[key] = Group(layout, key[1], [gate_id], zeros, none)
        else:
            group.gate_ids.append(gate_id)
            group.sums = torch.cat([group.sums, zeros])
            group.first_bad = torch.cat([group.first_bad, none])
        self.where[gate_id] = (key, len(self.groups[key].gate_ids) - 1)
        return key

    def add(self, gate_ids: list[int], p: torch.Tensor, step: int, offsets: tuple[int, ...] | None = None) -> None:
        """Fold gate outputs ``p [G, N, E]`` of the gates ``gate_ids`` into the window; entry i was seen at
        step ``step + offsets[i]`` (all at ``step`` when ``offsets`` is None)."""
        offsets = offsets if offsets is not None else (0,) * len(gate_ids)
        keys = {self._ensure(g, p.shape[-1], p) for g in gate_ids}
        if len(keys) != 1:  # same shape but different top-k: reduce each gate on its own
            for i, g in enumerate(gate_ids):
                self.add([g], p[i : i + 1], step + offsets[i])
            return
        key = keys.pop()
        group = self.groups[key]
        rows = self._on_device(tuple(self.where[g][1] for g in gate_ids), torch.int64, p.device)
        upd = window_sums(p, threshold=self.threshold, bins=self.bins, top_k=group.top_k, margin=self.margin)
        group.sums.index_add_(0, rows, upd.to(torch.float64))
        step_t, none_t = self._step_tensors(p.device, step)
        if any(offsets):
            step_t = step_t + self._on_device(offsets, torch.float64, p.device)
        group.first_bad.scatter_reduce_(0, rows, torch.where(upd[:, -1] > 0, step_t, none_t), "amin")

    def _on_device(self, values: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``values`` (state rows, step offsets) as a device tensor, made once per pattern: a window repeats
        the same patterns. On CUDA the copy is pinned and non-blocking, so it never waits for the device."""
        key = (values, dtype, device)
        cached = self._on_device_cache.get(key)
        if cached is None:
            host = torch.tensor(values, dtype=dtype)
            if device.type == "cuda":
                host = host.pin_memory()
            cached = host.to(device, non_blocking=True)
            self._on_device_cache[key] = cached
        return cached

    def _step_tensors(self, device: torch.device, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The current step and NO_STEP as device scalars (``fill_`` launches a kernel, never syncs)."""
        if self._steps is None or self._steps[0].device != device:
            self._steps = (
                torch.zeros((), dtype=torch.float64, device=device),
                torch.full((), float(NO_STEP), dtype=torch.float64, device=device),
            )
        if self._last_step != step:
            self._steps[0].fill_(float(step))
            self._last_step = step
        return self._steps

    def snapshot(self, step: int, extra: torch.Tensor | None = None) -> Snapshot | None:
        """Close the window: copy the state (and ``extra``, e.g. loss sums) into one flat tensor, reset.

        None when no gate has produced an output yet and there is no ``extra``.
        """
        if not self.groups and extra is None:
            return None
        layout: list[tuple[int, Layout]] = []
        parts: list[torch.Tensor] = []
        bads: list[torch.Tensor] = []
        for group in self.groups.values():
            layout += [(g, group.layout) for g in group.gate_ids]
            parts.append(group.sums.flatten())
            bads.append(group.first_bad)
        if extra is not None:
            bads.append(extra.to(device=parts[0].device if parts else extra.device, dtype=torch.float64))
        flat = torch.cat(parts + bads)
        for group in self.groups.values():
            group.sums.zero_()
            group.first_bad.fill_(float(NO_STEP))
        return Snapshot(step, layout, flat)


def to_host(snapshots: list[Snapshot]) -> list[torch.Tensor]:
    """Move the flat sums of several windows to the host in one transfer."""
    if not snapshots:
        return []
    host = torch.cat([s.flat for s in snapshots]).cpu()
    return list(host.split([s.flat.numel() for s in snapshots]))


def decode(
    snapshot: Snapshot, flat: torch.Tensor, n_extra: int
) -> tuple[dict[int, torch.Tensor], dict[int, int | None], torch.Tensor]:
    """Split a host copy of a snapshot into per-gate sums, first non-finite step, and the extra values."""
    sums: dict[int, torch.Tensor] = {}
    start = 0
    for gate_id, layout in snapshot.layout:
        sums[gate_id] = flat[start : start + layout.size]
        start += layout.size
    first_bad: dict[int, int | None] = {}
    for gate_id, _ in snapshot.layout:
        value = float(flat[start])
        first_bad[gate_id] = None if value >= NO_STEP else int(value)
        start += 1
    return sums, first_bad, flat[start : start + n_extra]


# ---------------------------------------------------------------- several processes (DDP / FSDP)
# Each rank keeps its own window sums. At a flush every rank re-indexes its closed windows to one
# layout that all ranks share (every gate any rank has seen, in gate order), the sums of all windows
# are added up across ranks in ONE all_reduce, and the first non-finite step of each gate (a minimum,
# not a sum) is min-reduced in a second, tiny collective only when some rank saw a NaN/Inf.


def relayout(snapshot: Snapshot, layout: list[tuple[int, Layout]], n_extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A window's state re-indexed to ``layout``: (sums of each gate then the extra values, first_bad of each gate).

    Gates the window lacks get zero sums and no non-finite step; a window without extra values gets zeros.
    """
    flat = snapshot.flat
    offsets: dict[int, tuple[int, Layout]] = {}
    start = 0
    for gate_id, local in snapshot.layout:
        offsets[gate_id] = (start, local)
        start += local.size
    bad_start = start
    bad_at = {gate_id: bad_start + i for i, (gate_id, _) in enumerate(snapshot.layout)}
    extra_start = bad_start + len(snapshot.layout)
    n_local_extra = flat.numel() - extra_start
    if n_local_extra not in (0, n_extra):
        raise ValueError(f"This rank logged {n_local_extra} loss values in a window, other ranks {n_extra}: every "
                         "rank must log the same tasks (watch.log_losses / watch.backward).")
    zero, none = flat.numel(), flat.numel() + 1  # two slots appended below
    sums: list[int] = []
    bads: list[int] = []
    for gate_id, wanted in layout:
        if gate_id not in offsets:
            sums += [zero] * wanted.size
            bads.append(none)
            continue
        at, local = offsets[gate_id]
        if local != wanted:
            raise ValueError(f"Gate {gate_id} has {local.experts} experts on this rank but {wanted.experts} on "
                             "another: every rank must run the same model.")
        sums += range(at, at + local.size)
        bads.append(bad_at[gate_id])
    sums += range(extra_start, extra_start + n_extra) if n_local_extra else [zero] * n_extra
    padded = torch.cat([flat, flat.new_tensor([0.0, float(NO_STEP)])])
    index = torch.tensor(sums + bads, device=flat.device)
    picked = padded.index_select(0, index)
    return picked[: len(sums)], picked[len(sums) :]


def collective_device(like: torch.device) -> torch.device:
    """Where a collective's tensors must live: the (CUDA) data device under NCCL, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return like if like.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_counts(counts: list[int]) -> tuple[list[int], list[int]]:
    """Largest and smallest positive value of each count over all ranks (0 = unknown), in one collective."""
    big = 2**62
    local = torch.tensor([*counts] + [-(c if c > 0 else big) for c in counts], dtype=torch.int64,
                         device=collective_device(torch.device("cpu")))
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    values = local.cpu().tolist()
    n = len(counts)
    return values[:n], [0 if -v == big else -v for v in values[n:]]


def reduce_windows(
    summed: torch.Tensor, first_bad: torch.Tensor, bad_columns: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum ``summed [W, S]`` over ranks and min-reduce ``first_bad [W, G]``; both come back on the host.

    ``bad_columns`` are the columns of ``summed`` that count non-finite samples: when they are all zero
    after the sum (the same answer on every rank), no rank saw a NaN/Inf, ``first_bad`` holds no step
    anywhere and its collective is skipped, so a clean flush costs one collective and one transfer.
    """
    device = collective_device(summed.device)
    summed = summed.to(device).contiguous()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    host = summed.cpu()
    if not bad_columns or not bool((host[:, bad_columns] > 0).any()):
        return host, torch.full(first_bad.shape, float(NO_STEP), dtype=torch.float64)
    first_bad = first_bad.to(device).contiguous()
    dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    return host, first_bad.cpu()
