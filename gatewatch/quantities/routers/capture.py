"""Sparse routers, capture half: where tokens were actually dispatched, per router and window.

For every gate that is a sparse router (``gate.router``: found in the table of known router classes, recognised
by its output, or stated in ``gw.Gate(router=...)``), the gate's forward hook (shared with the other quantities)
copies the router's logits, choice, weights and expert bias (:class:`~gatewatch.quantities.routers.dispatch.Held`)
into a :class:`~gatewatch.capture.window_buffer.WindowBuffer`. At the flush, or once ``HOLD_ELEMENTS`` logits are
held, each router's held passes are reduced in one batched pass to per-window sums (no host sync):
tokens, the dispatch count of each expert read from the router's own indices or dispatch mask, the count of
tokens that chose each expert before capacity dropped some, the dispatch weight per expert, the top-k boundary
margin in the router's choice space, and how many tokens' chosen set differs from the one the same router makes
with its expert bias at zero. The expert bias itself is snapshotted per window (REPLICATED: equal on every rank,
never summed). Slot ``"<i>"`` (SUM) holds gate i's sums per window, laid out by
:class:`~gatewatch.quantities.routers.read.Sums`; ``"<i>.bias"`` (REPLICATED) its bias.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from ...capture.gate_hooks import HookCall
from ...capture.per_expert import PerExpertSchedule
from ...capture.quantity import CaptureContext, Quantity, Reduction, Rows
from ...capture.window_buffer import Slot, WindowBuffer
from ...gating.specs import ResolvedGate
from .dispatch import Held, window_sums
from .read import Sums, router_tables

KEYWORDS: dict[str, Any] = {}
HOLD_ELEMENTS = 4_000_000  # router logits held until the flush (with their choices); above: fold early


def build(ctx: CaptureContext) -> RouterDispatch | None:
    routers = [i for i, g in enumerate(ctx.gates) if g.router is not None]
    return RouterDispatch(ctx, routers) if routers else None


class RouterDispatch(Quantity):
    """Per-window dispatch sums and expert bias of every sparse router (see the module docstring)."""

    name = "routers"

    def __init__(self, ctx: CaptureContext, indices: list[int]) -> None:
        self.ctx = ctx
        self.indices = indices
        for i in indices:
            self.add_state(f"{i}", Reduction.SUM)
            self.add_state(f"{i}.bias", Reduction.REPLICATED)
        self.buffer = WindowBuffer(self, ctx, self._reduce, hold_elements=HOLD_ELEMENTS)
        self._bias: dict[int, list[torch.Tensor]] = {i: [] for i in indices}
        self.schedule = PerExpertSchedule()  # which windows keep their ``router_experts`` rows
        for i in indices:
            self.hook_gate(ctx.gates[i], self._hook(i))

    def _hook(self, index: int) -> Any:
        router = self.ctx.gates[index].router
        assert router is not None

        def hook(call: HookCall) -> None:
            held = Held.read(router, call.module, call.output, 0)
            self.buffer.hold((index, held), held.logits.numel())

        return hook

    def _reduce(self, held: list[tuple[Slot, int, tuple[int, Held]]]) -> list[tuple[str, list[Slot], torch.Tensor]]:
        """Every held forward pass reduced to its window's sums: one batched pass per router."""
        by_router: dict[int, list[Held]] = {}
        for slot, _, (i, h) in held:
            by_router.setdefault(i, []).append(replace(h, window=slot))
        out = []
        for i, passes in by_router.items():
            gate = self.ctx.gates[i]
            assert gate.router is not None
            slots, sums = window_sums(gate.router, gate.module, passes, self.ctx.margin)
            out.append((f"{i}", slots, sums))
        return out

    def on_window(self, step: int) -> None:
        self.buffer.on_window(step)
        for i in (i for i in self.indices if not self.ctx.gates[i].elsewhere):  # another stage snapshots its own
            bias = self.ctx.gates[i].router.bias_of(self.ctx.gates[i].module)  # type: ignore[union-attr]
            if bias is not None:
                self._bias[i].append(bias.detach().to(torch.float64).clone())

    def collect(self, windows: list[int]) -> dict[str, torch.Tensor]:
        n = len(windows)
        states = self.buffer.collect(n)
        for i in self.indices:
            bias, self._bias[i] = self._bias[i][:n], self._bias[i][n:]
            if bias:
                states[f"{i}.bias"] = torch.stack(bias)
        return states

    def rows(self, windows: list[int], host: dict[str, np.ndarray]) -> Rows:
        steps = np.asarray(windows, dtype=np.int64)
        parts: dict[str, list[pd.DataFrame]] = {"routers": [], "router_experts": []}
        due = self.schedule.due(len(steps), sum(Sums.experts_in(host[f"{i}"].shape[1]) for i in self.indices
                                                if f"{i}" in host))
        for i in self.indices:
            if f"{i}" not in host:
                continue
            gate: ResolvedGate = self.ctx.gates[i]
            sums = host[f"{i}"]
            bias = host.get(f"{i}.bias")
            names = gate.expert_names() or [str(j) for j in range(Sums.experts_in(sums.shape[1]))]
            for table, df in router_tables(gate.name, gate.router.top_k, gate.router.mask is not None,  # type: ignore[union-attr]
                                           steps, sums, bias, names, due).items():
                parts[table].append(df)
        return {name: pd.concat(dfs, ignore_index=True) for name, dfs in parts.items() if dfs}

    def on_close(self) -> None:
        self.schedule.close()

    def describe(self) -> dict[str, Any]:
        every = {"per_expert_every": {"router_experts": self.schedule.every}} if self.schedule.every else {}
        return {**every, "routers": [{"gate": self.ctx.gates[i].name, "scoring": r.scoring, "top_k": r.top_k,
                             "bias": r.bias, "groups": list(r.groups) if r.groups else None,
                             "capacity": r.capacity}
                            for i in self.indices if (r := self.ctx.gates[i].router) is not None]}

    def detach(self) -> None:
        super().detach()
        self.buffer.clear()
