"""Sample groups on a shared gate, capture half: each gate's rows summed per group and window.

``GateWatch(..., sample_groups=["code", "maths", "chat"])`` names the groups; the loop labels each batch with
``with watch.grouped(labels): out = model(x)`` (the kit's ``watch.batch(sample_groups=labels)``). ``labels`` is an
integer tensor ``[B]`` (one group per sample or sequence) or ``[B, S]`` (one per token) indexing the names; ``-1``
leaves a row out (padding). Labels stand until the next ``grouped()`` call; a forward recomputed by activation
checkpointing is not seen (the shared gate hooks skip it), so it is not counted twice.

Each gate's forward hook matches its rows to the labels (``[B]`` labels to a ``[B, E]`` gate, or repeated over the
``B*S`` tokens a router sees, batch-major; ``[B, S]`` labels to ``B*S`` rows) and holds the rows' affinities, the
router's own choice and the labels in a :class:`~gatewatch.capture.window_buffer.WindowBuffer`. At the flush, or
once ``HOLD_ELEMENTS`` are held, the held passes of each gate are reduced in one batched pass to per-window sums
(layout of :func:`~gatewatch.quantities.groups.read.split_sums`; SUM over ranks, so exact under DDP): rows per
group, affinity per group and expert, dispatch per group and expert (routers), and the joint of the same routing
with uninformative labels (the baseline). The uninformative labels are drawn once per batch, from a generator of
the watch's own (the training's random numbers are untouched), with the groups' frequencies in the labels so far.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from ...capture.gate_hooks import HookCall
from ...capture.per_expert import PerExpertSchedule
from ...capture.quantity import CaptureContext, Quantity, Reduction, Rows
from ...capture.window_buffer import Slot, WindowBuffer
from ...gating.specs import ResolvedGate
from ...validate import positive_int
from .read import group_tables, sums_layout

KEYWORDS: dict[str, Any] = {"sample_groups": None, "group_experts_every": None}
HOLD_ELEMENTS = 4_000_000  # affinities held until the flush; above: fold early
SEED = 20240611  # the uninformative labels' generator


def build(ctx: CaptureContext) -> SampleGroups | None:
    names = ctx.options["sample_groups"]
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in _sequence(names)):
        raise TypeError(f"sample_groups is a list of group names, e.g. sample_groups=['code', 'maths', 'chat']; "
                        f"got {names!r}.")
    names = list(names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"sample_groups must be distinct, non-empty names (at least one); got {names}.")
    every = ctx.options["group_experts_every"]
    if every is not None:
        every = positive_int("group_experts_every", every, unit="windows")
    return SampleGroups(ctx, names, every)


def _sequence(value: Any) -> list[Any]:
    try:
        return list(value)
    except TypeError:
        return [None]


class SampleGroups(Quantity):
    """Per-window sums of every gate's rows by sample group (see the module docstring). State ``"<i>"`` (SUM):
    gate i's sums per window."""

    name = "groups"
    batch_keys = ("sample_groups",)

    def __init__(self, ctx: CaptureContext, names: list[str], every: int | None) -> None:
        self.ctx, self.names = ctx, names
        self.schedule = PerExpertSchedule(every)  # which windows keep the per-expert lists
        for i in range(len(ctx.gates)):
            self.add_state(f"{i}", Reduction.SUM)
        self.buffer = WindowBuffer(self, ctx, self._reduce, hold_elements=HOLD_ELEMENTS)
        self.labels: torch.Tensor | None = None  # this batch's labels, out-of-range ones at -2
        self.shuffled: torch.Tensor | None = None  # the uninformative labels of the same rows
        self._seen: torch.Tensor | None = None  # rows per group in the labels so far (float64)
        self._generator: torch.Generator | None = None
        self._told: set[str] = set()  # gates whose out-of-range labels were reported
        for i, gate in enumerate(ctx.gates):
            self.hook_gate(gate, self._hook(i))

    # ------------------------------------------------------------------ labels
    def on_batch(self, inputs: dict[str, Any]) -> None:
        labels = inputs.get("sample_groups")
        if labels is None:
            self.labels = self.shuffled = None
            return
        labels = self._check(labels)
        device = _device_of(self.ctx.model, labels)
        if labels.device != device:
            labels = (labels.pin_memory().to(device, non_blocking=True) if device.type == "cuda"
                      else labels.to(device))
        g = len(self.names)
        labels = torch.where((labels < -1) | (labels >= g), -2, labels)  # device labels: counted, left out
        self.labels, self.shuffled = labels, self._uninformative(labels)

    def _check(self, labels: Any) -> torch.Tensor:
        t = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.dim() not in (1, 2):
            raise TypeError(f"watch.grouped(labels): labels are an integer tensor [B] (one group per sample or "
                            f"sequence) or [B, S] (one per token) indexing sample_groups={self.names}, -1 to leave "
                            f"a row out; got {t.dtype} of shape {tuple(t.shape)}.")
        if t.device.type == "cpu" and t.numel():
            bad = t[(t < -1) | (t >= len(self.names))]
            if bad.numel():
                raise ValueError(f"watch.grouped(labels): labels index sample_groups={self.names} (0 to "
                                 f"{len(self.names) - 1}, -1 to leave a row out); got {sorted(set(bad.tolist()))[:5]}.")
        return t.long()

    def _uninformative(self, labels: torch.Tensor) -> torch.Tensor:
        """A random group per labelled row, drawn with the groups' frequencies in the labels so far (device ops)."""
        g = len(self.names)
        if self._seen is None or self._seen.device != labels.device:
            self._seen = torch.zeros(g, dtype=torch.float64, device=labels.device)
            self._generator = torch.Generator(device=labels.device).manual_seed(SEED)
        valid = labels >= 0
        self._seen.index_add_(0, labels.clamp_min(0).reshape(-1), valid.reshape(-1).to(torch.float64))
        cumulative = torch.cumsum(self._seen + 1e-12, 0)
        u = torch.rand(labels.shape, dtype=torch.float64, device=labels.device, generator=self._generator)
        drawn = torch.searchsorted(cumulative, (u * cumulative[-1]).reshape(-1)).clamp_max(g - 1)
        return torch.where(valid, drawn.reshape(labels.shape), labels)

    def _rows(self, gate: ResolvedGate, labels: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
        """``labels`` matched to the ``n`` rows of ``gate``'s output, flat ``[n]``."""
        if labels.dim() == 1 and labels.shape[0] and n % labels.shape[0] == 0:
            flat = labels if n == labels.shape[0] else labels.repeat_interleave(n // labels.shape[0], output_size=n)
        elif labels.dim() == 2 and labels.numel() == n:
            flat = labels.reshape(-1)
        else:
            raise ValueError(
                f"watch.grouped(labels): labels of shape {tuple(labels.shape)} do not match gate {gate.name!r}, "
                f"whose output has {n} rows. Labels [B] match a gate of B rows ([B, E]) or a router that sees "
                f"B*S tokens (batch-major); labels [B, S] match B*S rows. Pass this forward's labels to "
                f"watch.grouped() around each forward.")
        return flat.to(device)

    # ------------------------------------------------------------------ capture
    def _hook(self, index: int) -> Any:
        gate = self.ctx.gates[index]

        def hook(call: HookCall) -> None:
            if self.labels is None or self.shuffled is None:
                return
            p = call.probs(gate)
            n = p.shape[0]
            labels = self._rows(gate, self.labels, n, p.device)
            shuffled = self._rows(gate, self.shuffled, n, p.device)
            idx = mask = None
            if gate.router is not None:
                idx, mask = gate.router.dispatch(call.output)
                idx = None if idx is None else idx.detach().clone()
                mask = None if mask is None else mask.detach().clone()
            self.buffer.hold((index, p, labels, shuffled, idx, mask), p.numel())

        return hook

    def _reduce(self, held: list[tuple[Slot, int, Any]]) -> list[tuple[str, list[Slot], torch.Tensor]]:
        """Every held forward pass reduced to its window's sums: one batched pass per gate."""
        by_gate: dict[int, list[tuple[Slot, Any]]] = {}
        for slot, _, item in held:
            by_gate.setdefault(item[0], []).append((slot, item))
        return [(f"{i}", *self._gate_sums(items)) for i, items in by_gate.items()]

    def _gate_sums(self, items: list[tuple[Slot, Any]]) -> tuple[list[Slot], torch.Tensor]:
        """The windows of one gate's held passes (sorted) and their sums ``[windows, G + 3GE + 1]``."""
        windows = sorted({slot for slot, _ in items})
        at = {w: j for j, w in enumerate(windows)}
        p = torch.cat([item[1] for _, item in items]).to(torch.float64)
        t, e = p.shape
        g, nw, dev = len(self.names), len(windows), p.device
        f64: dict[str, Any] = {"dtype": torch.float64, "device": dev}
        win = torch.repeat_interleave(torch.tensor([at[slot] for slot, _ in items], device=dev),
                                      torch.tensor([len(item[1]) for _, item in items], device=dev), output_size=t)
        labels = torch.cat([item[2] for _, item in items])
        shuffled = torch.cat([item[3] for _, item in items])
        valid = (labels >= 0).to(torch.float64)
        row = win * g + labels.clamp_min(0)
        fake = win * g + shuffled.clamp_min(0)
        tokens = torch.zeros(nw * g, **f64).index_add_(0, row, valid)
        share = torch.zeros(nw * g, e, **f64).index_add_(0, row, p * valid[:, None])
        if items[0][1][4] is not None:  # a router's indices [T, k]: one (row, expert) pair per chosen expert
            idx = torch.cat([item[4] for _, item in items]).long()
            k = idx.shape[1]
            weight = valid.repeat_interleave(k)
            load = torch.zeros(nw * g * e, **f64).index_add_(0, (row[:, None] * e + idx).reshape(-1), weight)
            base = torch.zeros(nw * g * e, **f64).index_add_(0, (fake[:, None] * e + idx).reshape(-1), weight)
        elif items[0][1][5] is not None:  # a capacity router's dispatch mask [T, E]
            mask = torch.cat([item[5] for _, item in items]).reshape(t, e).to(torch.float64) * valid[:, None]
            load = torch.zeros(nw * g, e, **f64).index_add_(0, row, mask)
            base = torch.zeros(nw * g, e, **f64).index_add_(0, fake, mask)
        else:  # a dense gate: no dispatch; the baseline is weighted by the affinity
            load = torch.zeros(nw * g, e, **f64)
            base = torch.zeros(nw * g, e, **f64).index_add_(0, fake, p * valid[:, None])
        invalid = torch.zeros(nw, **f64).index_add_(0, win, (labels == -2).to(torch.float64))
        return windows, torch.cat([tokens.view(nw, g), share.reshape(nw, -1), load.reshape(nw, -1),
                                   base.reshape(nw, -1), invalid[:, None]], dim=1)

    # ------------------------------------------------------------------ flush
    def on_window(self, step: int) -> None:
        self.buffer.on_window(step)

    def on_close(self) -> None:
        self.schedule.close()

    def collect(self, windows: list[int]) -> dict[str, torch.Tensor]:
        return self.buffer.collect(len(windows))

    def rows(self, windows: list[int], host: dict[str, np.ndarray]) -> Rows:
        steps = np.asarray(windows, dtype=np.int64)
        g = len(self.names)
        present = [(i, host[f"{i}"]) for i in range(len(self.ctx.gates)) if f"{i}" in host]
        values = sum(g * sums_layout(s.shape[1], g) for _, s in present)
        detail = self.schedule.due(len(steps), values)
        parts: dict[str, list[pd.DataFrame]] = {"group_routing": [], "group_specialisation": []}
        events = []
        for i, sums in present:
            gate = self.ctx.gates[i]
            for table, df in group_tables(gate.name, self.names, gate.router is not None, steps, sums,
                                          detail).items():
                parts[table].append(df)
            bad = sums[:, -1]
            if bad.any() and gate.name not in self._told:
                self._told.add(gate.name)
                events.append({"step": int(steps[bad > 0][0]), "kind": "group_labels", "source": gate.name,
                               "message": f"{int(bad.sum())} rows of gate {gate.name!r} had sample_groups labels "
                                          f"outside 0..{g - 1} (or -1); they are left out of the group statistics."})
        out: Rows = {name: pd.concat(dfs, ignore_index=True) for name, dfs in parts.items() if dfs}
        if events:
            out["events"] = events
        return out

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sample_groups": list(self.names)}
        if self.schedule.every is not None:
            out["per_expert_every"] = {"group_routing": self.schedule.every}
        return out

    def detach(self) -> None:
        super().detach()
        self.buffer.clear()
        self.labels = self.shuffled = None


def _device_of(model: torch.nn.Module, labels: torch.Tensor) -> torch.device:
    """Where the gates run: the model's first parameter's device (the labels' own when it has none)."""
    param = next(model.parameters(), None)
    return labels.device if param is None else param.device
