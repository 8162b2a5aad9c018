"""Sparse routers, capture half: where tokens were actually dispatched, per router and window.

For every gate that is a sparse router (``gate.router``: found in the table of known router classes, recognised
by its output, or stated in ``gw.Gate(router=...)``), a forward hook copies the router's logits, choice, weights
and expert bias (:class:`~gatewatch.quantities.routers.dispatch.Held`). At the flush, or once ``HOLD_ELEMENTS``
logits are held, each router's held passes are reduced in one batched pass to per-window sums (no host sync):
tokens, the dispatch count of each expert read from the router's own indices or dispatch mask, the count of
tokens that chose each expert before capacity dropped some, the dispatch weight per expert, the top-k boundary
margin in the router's choice space, and how many tokens' chosen set differs from the one the same router makes
with its expert bias at zero. The expert bias itself is snapshotted per window (REPLICATED: equal on every rank,
never summed). Slot ``"<i>"`` (SUM) holds gate i's sums per window, laid out by
:class:`~gatewatch.quantities.routers.read.Sums`; ``"<i>.bias"`` (REPLICATED) its bias.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ...capture.quantity import CaptureContext, Quantity, Reduction, Rows, State
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
        self.slots = {f"{i}": Reduction.SUM for i in indices}
        self._window = 0  # ordinal of the open window
        self._ends: list[int] = []  # ordinals of the windows closed since the last collect
        self._held: dict[int, list[Held]] = {i: [] for i in indices}
        self._held_elements = 0
        self._sums: dict[int, dict[int, torch.Tensor]] = {i: {} for i in indices}  # gate -> window -> sums
        self._bias: dict[int, list[torch.Tensor]] = {i: [] for i in indices}
        self._handles = [ctx.gates[i].module.register_forward_hook(self._hook(i)) for i in indices]

    def _hook(self, index: int) -> Callable[..., None]:
        router = self.ctx.gates[index].router
        assert router is not None

        def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            if not module.training:
                return
            held = Held.read(router, module, output, self._window)
            self._held[index].append(held)
            self._held_elements += held.logits.numel()
            if self._held_elements > HOLD_ELEMENTS:
                self._fold()

        return hook

    def _fold(self) -> None:
        """Reduce every held forward pass into its window's sums (one batched pass per router)."""
        for i, held in self._held.items():
            if not held:
                continue
            gate = self.ctx.gates[i]
            assert gate.router is not None
            windows, sums = window_sums(gate.router, gate.module, held, self.ctx.margin)
            for w, row in zip(windows, sums, strict=True):
                have = self._sums[i].get(w)
                self._sums[i][w] = row if have is None else have + row
            self._held[i] = []
        self._held_elements = 0

    def on_window(self, step: int) -> None:
        self._ends.append(self._window)
        self._window += 1
        for i in self.indices:
            bias = self.ctx.gates[i].router.bias_of(self.ctx.gates[i].module)  # type: ignore[union-attr]
            if bias is not None:
                self._bias[i].append(bias.detach().to(torch.float64).clone())

    def collect(self, windows: list[int]) -> dict[str, State]:
        self._fold()
        n = len(windows)
        ends, self._ends = self._ends[:n], self._ends[n:]
        states: dict[str, State] = {}
        for i in self.indices:
            closed = [self._sums[i].pop(w, None) for w in ends]
            known = next((s for s in closed if s is not None), None)
            if known is not None:
                rows = [torch.zeros_like(known) if s is None else s for s in closed]
                states[f"{i}"] = State(torch.stack(rows), Reduction.SUM)
            bias, self._bias[i] = self._bias[i][:n], self._bias[i][n:]
            if bias:
                states[f"{i}.bias"] = State(torch.stack(bias), Reduction.REPLICATED)
        return states

    def rows(self, windows: list[int], host: dict[str, np.ndarray]) -> Rows:
        steps = np.asarray(windows, dtype=np.int64)
        parts: dict[str, list[pd.DataFrame]] = {"routers": [], "router_experts": []}
        for i in self.indices:
            if f"{i}" not in host:
                continue
            gate: ResolvedGate = self.ctx.gates[i]
            sums = host[f"{i}"]
            bias = host.get(f"{i}.bias")
            names = gate.expert_names() or [str(j) for j in range(Sums.experts_in(sums.shape[1]))]
            for table, df in router_tables(gate.name, gate.router.top_k, gate.router.mask is not None,  # type: ignore[union-attr]
                                           steps, sums, bias, names).items():
                parts[table].append(df)
        return {name: pd.concat(dfs, ignore_index=True) for name, dfs in parts.items() if dfs}

    def describe(self) -> dict[str, Any]:
        return {"routers": [{"gate": self.ctx.gates[i].name, "scoring": r.scoring, "top_k": r.top_k,
                             "bias": r.bias, "groups": list(r.groups) if r.groups else None,
                             "capacity": r.capacity}
                            for i in self.indices if (r := self.ctx.gates[i].router) is not None]}

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
