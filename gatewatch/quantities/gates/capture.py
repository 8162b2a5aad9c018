"""Gate statistics, capture half: every gate's outputs, reduced to additive window sums.

A forward hook on each gate (shared with the other quantities) keeps a reference to its output (no copy, no op)
in a :class:`~gatewatch.capture.window_buffer.WindowBuffer`. Once ``HOLD_ELEMENTS`` weights (or 64 outputs of a
gate in one step) are held, and at the flush, the held outputs are reduced together, one stacked pass of
:func:`~gatewatch.maths.gate_sums.window_sums` per gate shape, and added to each gate's per-window sums: memory
stays bounded whatever the flush interval, and the flush folds only the last steps' outputs. Nothing here
synchronises with the host between flushes (apart from the first output of each gate, checked once).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch

from ...capture.gate_hooks import HookCall
from ...capture.mesh import expert_shard
from ...capture.per_expert import PerExpertSchedule
from ...capture.quantity import CaptureContext, Quantity, Reduction, Rows, to_device
from ...capture.window_buffer import Slot, WindowBuffer
from ...gating.expert_map import map_experts
from ...gating.specs import GateOutputError, ResolvedGate
from ...maths.gate_metrics import Layout, drift_bits, window_metrics
from ...maths.gate_sums import window_sums

KEYWORDS: dict[str, Any] = {}  # gate statistics use the watch's own every, threshold, bins and margin
# Gate weights held before they are folded into their windows' sums (2 MB of float32). Folds of about 0.5 M weights
# keep their temporaries small enough for the allocator to reuse: a 4-task census MMoE folded its 3.3 M weights at
# each flush in 34 ms on the training thread; now a sixth of them every 16 steps, and the flush folds the rest.
HOLD_ELEMENTS = 1 << 19
STEP_CALLS = 64  # outputs per gate held in one step (forward passes without step()); above: fold early


def build(ctx: CaptureContext) -> GateStatistics:
    return GateStatistics(ctx)


class GateStatistics(Quantity):
    """Per-window sums of every gate (see the module docstring). States: ``"<i>"`` (the sums of gate i, SUM)
    and ``"<i>.bad"`` (the first step with a NaN/Inf output in the window, MIN)."""

    name = "gates"

    def __init__(self, ctx: CaptureContext) -> None:
        self.ctx = ctx
        self.gates = ctx.gates
        for i in range(len(self.gates)):
            self.add_state(f"{i}", Reduction.SUM)
            self.add_state(f"{i}.bad", Reduction.MIN)
        self.buffer = WindowBuffer(self, ctx, self._reduce, hold_elements=HOLD_ELEMENTS,
                                   step_calls=STEP_CALLS * len(self.gates))
        self._prev_share: dict[str, np.ndarray] = {}
        self._nonfinite_seen: set[str] = set()
        self._started: set[int] = set()  # gates that have had a window with samples (on some rank)
        self.schedule = PerExpertSchedule()  # which windows keep their ``shares`` rows
        for i, gate in enumerate(self.gates):
            self.hook_gate(gate, self._hook(i))

    # ------------------------------------------------------------------ capture
    def _hook(self, index: int) -> Any:
        gate = self.gates[index]

        def hook(call: HookCall) -> None:
            p = call.probs(gate)
            if gate.n_experts is None:
                self._first_output(gate, p)
            self.buffer.hold((index, p), p.numel())

        return hook

    def _first_output(self, gate: ResolvedGate, p: torch.Tensor) -> None:
        """Check a gate's first output once (one host sync) and record its expert count."""
        if gate.output == "probs":
            rows = p.sum(-1)
            rows = rows[torch.isfinite(rows)]
            # 1e-2: a bfloat16 softmax (CPU autocast) sums to 1 only within ~4e-3; logits are far further off
            if rows.numel() and ((rows - 1).abs().max() > 1e-2 or (p[torch.isfinite(p)] < 0).any()):
                raise GateOutputError(
                    f"Gate {gate.name!r} ({gate.path}) output rows sum to {float(rows.min()):.4g}.."
                    f"{float(rows.max()):.4g}, not 1: it does not look like probabilities. If the module emits "
                    f'logits (softmax applied later), pass gw.Gate("{gate.path}", output="logits").'
                )
        self._set_experts(gate, p.shape[-1])

    def _set_experts(self, gate: ResolvedGate, e: int) -> None:
        """Record a gate's expert count (from its output, or from another rank) and label its experts."""
        if gate.experts is not None and len(gate.experts) != e:
            raise GateOutputError(f"Gate {gate.name!r} has {e} outputs but {len(gate.experts)} expert names were "
                                  "given.")
        if gate.experts is None and gate.task is None and sum(g.task is None for g in self.gates) > 1:
            gate.experts = [f"{gate.name}:{i}" for i in range(e)]  # task-less gates (layers) own their experts
        gate.n_experts = e
        if gate.elsewhere:  # another pipeline stage holds it: its experts are not in this rank's model
            return
        map_experts(self.ctx.model, gate, e, self.ctx.tasks, expert_shard(self.ctx.mesh))  # 'ep': some experts

    def on_window(self, step: int) -> None:
        self.buffer.on_window(step)

    def _reduce(self, held: list[tuple[Slot, int, tuple[int, torch.Tensor]]]
                ) -> list[tuple[str, list[Slot], torch.Tensor]]:
        """The window sums of held outputs: one stacked ``window_sums`` per gate shape; the first step with a
        NaN/Inf output per window."""
        groups: dict[tuple[Any, ...], list[tuple[int, int, int, torch.Tensor]]] = {}  # (slot, step, gate, p)
        for slot, step, (index, p) in held:
            key = (tuple(p.shape), p.device, p.dtype, self.gates[index].top_k)
            groups.setdefault(key, []).append((slot, step, index, p))
        out: list[tuple[str, list[Slot], torch.Tensor]] = []
        for (_, device, _, top_k), items in groups.items():
            stacked = torch.stack([p for *_, p in items]) if len(items) > 1 else items[0][3].unsqueeze(0)
            upd = window_sums(stacked, threshold=self.ctx.threshold, bins=self.ctx.bins, top_k=top_k,
                              margin=self.ctx.margin).to(torch.float64)
            for index in dict.fromkeys(item[2] for item in items):
                mine = [n for n, item in enumerate(items) if item[2] == index]
                rows = upd if len(mine) == len(items) else upd[to_device(mine, torch.int64, device)]
                slots = [items[n][0] for n in mine]
                steps = to_device([float(items[n][1]) for n in mine], torch.float64, device)
                out += [(f"{index}", slots, rows), (f"{index}.bad", slots, torch.where(rows[:, -1] > 0, steps,
                                                                                        math.inf))]
        return out

    # ------------------------------------------------------------------ flush
    def collect(self, windows: list[int]) -> dict[str, torch.Tensor]:
        return self.buffer.collect(len(windows))

    def rows(self, windows: list[int], host: dict[str, np.ndarray]) -> Rows:
        """The ``gates``, ``hist`` and ``experts`` rows of every window, and the ``shares`` rows of the windows the
        per-expert schedule keeps, computed per gate at once."""
        steps = np.asarray(windows, dtype=np.int64)
        values = sum(Layout.experts_in(host[f"{i}"].shape[1], self.ctx.bins) for i in range(len(self.gates))
                     if f"{i}" in host)
        due = self.schedule.due(len(steps), values)
        tables: dict[str, list[pd.DataFrame]] = {"gates": [], "shares": [], "hist": [], "mix": []}
        events: list[dict[str, Any]] = []
        for i, gate in enumerate(self.gates):
            if f"{i}" not in host:
                continue
            if gate.n_experts is None:  # seen on another rank only
                self._set_experts(gate, Layout.experts_in(host[f"{i}"].shape[1], self.ctx.bins))
            layout = Layout(gate.n_experts or 0, self.ctx.bins)
            m = window_metrics(host[f"{i}"], layout)
            keep = self._from_first_sample(i, m)
            if not keep.any():
                continue
            m = {k: v[keep] for k, v in m.items()}
            bad = host[f"{i}.bad"][keep, 0]
            first_bad = pd.array(np.where(np.isfinite(bad), bad, 0).astype(np.int64), dtype="Int64")
            first_bad[~np.isfinite(bad)] = pd.NA
            self._gate_tables(gate, steps[keep], m, first_bad, due[keep], tables)
            if np.isfinite(bad).any() and gate.name not in self._nonfinite_seen:
                self._nonfinite_seen.add(gate.name)
                at = int(bad[np.isfinite(bad)][0])
                events.append({"step": at, "kind": "nonfinite", "source": gate.name, "message": (
                    f"gate {gate.name!r} produced NaN/Inf weights first at step {at}; those samples are left out of "
                    "its statistics.")})
        mix = tables.pop("mix")
        out: Rows = {name: pd.concat(dfs, ignore_index=True) for name, dfs in tables.items() if dfs}
        if mix:
            out["experts"] = _expert_rows(pd.concat(mix, ignore_index=True))
        out["events"] = events
        return out

    def _from_first_sample(self, index: int, m: dict[str, np.ndarray]) -> np.ndarray:
        """Which windows get rows: a gate's rows start with the first window it saw a sample in (on any rank)."""
        seen = (m["samples"] + m["nonfinite"]) > 0
        if index in self._started:
            return np.ones_like(seen)
        if seen.any():
            self._started.add(index)
        return np.cumsum(seen) > 0

    def _gate_tables(self, gate: ResolvedGate, steps: np.ndarray, m: dict[str, np.ndarray], first_bad: Any,
                     due: np.ndarray, tables: dict[str, list[pd.DataFrame]]) -> None:
        """Append one gate's rows over several windows, column by column (``shares`` in the ``due`` ones)."""
        w, e = m["share"].shape
        valid = m["samples"] > 0
        share = m["share"]
        drift, last = drift_bits(share, valid, self._prev_share.get(gate.name))
        if last is not None:
            self._prev_share[gate.name] = last
        names = gate.expert_names() or [str(i) for i in range(e)]
        selected = m["selected"] if gate.top_k else np.full_like(share, np.nan)
        tables["gates"].append(pd.DataFrame({
            "step": steps, "gate": gate.name, "task": gate.task, "level": gate.level, "experts": e,
            **{k: m[k] for k in ("samples", "entropy", "entropy_of_mean", "mutual_info", "effective_experts",
                                 "polarization", "max_weight")},
            "top_share": np.where(valid, share.max(1, initial=-np.inf), np.nan), "spread": m["spread"],
            "drift": drift, "small_margin": m["small_margin"] if gate.top_k else np.nan,
            "nonfinite": m["nonfinite"], "first_nonfinite_step": first_bad,
        }))
        n = int(due.sum())
        tables["shares"].append(pd.DataFrame({
            "step": np.repeat(steps[due], e), "gate": gate.name, "expert": np.tile(np.arange(e), n),
            "expert_name": np.tile(np.array(names, dtype=object), n), "share": share[due].ravel(),
            "std": m["std"][due].ravel(), "top1": m["top1"][due].ravel(), "selected": selected[due].ravel(),
        }))
        edges = np.linspace(0, 1, self.ctx.bins + 1)
        tables["hist"].append(pd.DataFrame({
            "step": np.repeat(steps, self.ctx.bins), "gate": gate.name, "bin": np.tile(np.arange(self.ctx.bins), w),
            "lo": np.tile(edges[:-1], w), "hi": np.tile(edges[1:], w), "count": m["hist"].ravel(),
        }))
        if gate.router is not None:
            return  # a router's expert i is unrelated to another layer's: its load is per layer (routers table)
        tables["mix"].append(pd.DataFrame({
            "step": np.repeat(steps[valid], e), "expert": np.tile(np.array(names, dtype=object), int(valid.sum())),
            "utilization": share[valid].ravel(), "reference": 1.0 / e, "selected": selected[valid].ravel(),
        }))

    def on_close(self) -> None:
        self.schedule.close()

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"gates": [g.describe() for g in self.gates]}
        if self.schedule.every is not None:
            out["per_expert_every"] = {"shares": self.schedule.every}
        return out

    def detach(self) -> None:
        super().detach()
        self.buffer.clear()


def _expert_rows(mix: pd.DataFrame) -> pd.DataFrame:
    """Utilization of each expert label per window: its share averaged over the gates that mix it."""
    mix = mix.sort_values("step", kind="stable")
    grouped = mix.groupby(["step", "expert"], sort=False)
    out = grouped[["utilization", "reference", "selected"]].mean()
    out["gates"] = grouped.size()
    return out.reset_index()
