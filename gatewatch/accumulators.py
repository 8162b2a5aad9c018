"""Window sums of every gate, kept on the model's device and updated without host synchronisation.

Gates with the same number of experts (and top-k) share one state tensor ``[G, Layout.size]`` in
float64; gate outputs of one step with the same shape are stacked and reduced in one pass, so the
per-step cost depends on the number of distinct gate shapes, not on the number of gates. A window
ends with :meth:`GateAccumulator.snapshot`, which copies the state into one flat device tensor (no
transfer) and zeroes it; :func:`to_host` moves any number of snapshots to the host in one transfer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
        self._rows: dict[tuple[int, ...], torch.Tensor] = {}
        self._steps: tuple[torch.Tensor, torch.Tensor] | None = None
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
        self._rows.clear()
        return key

    def add(self, gate_ids: list[int], p: torch.Tensor, step: int) -> None:
        """Fold gate outputs ``p [G, N, E]`` of the gates ``gate_ids`` (one step) into the window."""
        keys = {self._ensure(g, p.shape[-1], p) for g in gate_ids}
        if len(keys) != 1:  # same shape but different top-k: reduce each gate on its own
            for i, g in enumerate(gate_ids):
                self.add([g], p[i : i + 1], step)
            return
        key = keys.pop()
        group = self.groups[key]
        rows = self._row_index(tuple(gate_ids), key, p.device)
        upd = window_sums(p, threshold=self.threshold, bins=self.bins, top_k=group.top_k, margin=self.margin)
        group.sums.index_add_(0, rows, upd.to(torch.float64))
        step_t, none_t = self._step_tensors(p.device, step)
        group.first_bad.scatter_reduce_(0, rows, torch.where(upd[:, -1] > 0, step_t, none_t), "amin")

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

    def _row_index(
        self, gate_ids: tuple[int, ...], key: tuple[int, int | None], device: torch.device
    ) -> torch.Tensor:
        rows = self._rows.get(gate_ids)
        if rows is None:
            rows = torch.tensor([self.where[g][1] for g in gate_ids], device=device)
            self._rows[gate_ids] = rows
        return rows

    def snapshot(self, step: int, extra: torch.Tensor | None = None) -> Snapshot | None:
        """Close the window: copy the state (and ``extra``, e.g. loss sums) into one flat tensor, reset."""
        if not self.groups:
            return None
        layout: list[tuple[int, Layout]] = []
        parts: list[torch.Tensor] = []
        bads: list[torch.Tensor] = []
        for group in self.groups.values():
            layout += [(g, group.layout) for g in group.gate_ids]
            parts.append(group.sums.flatten())
            bads.append(group.first_bad)
        if extra is not None:
            bads.append(extra.to(device=parts[0].device, dtype=torch.float64))
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
