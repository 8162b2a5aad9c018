"""Sparse routers, capture half: where tokens were actually dispatched, per router and window.

For every gate that is a sparse router (``gate.router``: found in the table of known router classes, or
stated in ``gw.Gate(router=...)``), a forward hook adds to the open window's device sums (no host sync):
tokens, the dispatch count of each expert read from the router's own indices or dispatch mask, the
count of tokens that chose each expert before capacity dropped some, the dispatch weight per expert, the
top-k boundary margin in the router's choice space, and how many tokens' chosen set differs from the one
the same router makes with its expert bias at zero. The expert bias itself is snapshotted per window
(REPLICATED: equal on every rank, never summed). Slot ``"<i>"`` (SUM) holds gate i's sums per window,
laid out by :class:`~gatewatch.quantities.routers.read.Sums`; ``"<i>.bias"`` (REPLICATED) its bias.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ...capture.quantity import CaptureContext, Quantity, Reduction, Rows, State
from ...gates import ResolvedGate
from .read import Sums, router_tables
from .table import Router, choice_scores, choose

KEYWORDS: dict[str, Any] = {}


def build(ctx: CaptureContext) -> RouterDispatch | None:
    routers = [i for i, g in enumerate(ctx.gates) if g.router is not None]
    return RouterDispatch(ctx, routers) if routers else None


def dispatch_sums(router: Router, module: nn.Module, out: Any, margin: float) -> torch.Tensor:
    """One forward pass of a router reduced to its additive sums ``[Sums(E).size]`` (float64, on the device)."""
    logits = router.logits(out).detach()
    logits = logits.reshape(-1, logits.shape[-1]).float()
    t, e = logits.shape
    idx, mask = router.dispatch(out)
    if mask is not None:  # capacity router: the mask holds what was kept, the argmax what was chosen
        mask = mask.detach().to(torch.float64)
        load = mask.sum(0)
        chose = torch.zeros(e, dtype=torch.float64, device=logits.device).index_add_(
            0, logits.argmax(-1), torch.ones(t, dtype=torch.float64, device=logits.device))
        weight = (mask * router.weights(out).detach().reshape(-1, 1).to(torch.float64)).sum(0)
        changed = torch.zeros(1, dtype=torch.float64, device=logits.device)
    else:
        idx = idx.detach().long()
        ones = torch.ones(idx.numel(), dtype=torch.float64, device=logits.device)
        load = torch.zeros(e, dtype=torch.float64, device=logits.device).index_add_(0, idx.reshape(-1), ones)
        chose = load
        w = router.weights(out).detach().reshape(-1).to(torch.float64)
        weight = torch.zeros_like(load).index_add_(0, idx.reshape(-1), w)
        changed = _bias_changed(router, module, logits, idx)
    k = router.top_k
    space = choice_scores(router, module, logits)
    if k < e:
        vals = space.topk(k + 1, dim=-1)[0]
        gap = vals[:, k - 1] - vals[:, k]
        ok = torch.isfinite(gap)
        gap = torch.where(ok, gap, 0.0).to(torch.float64)
        ok64 = ok.to(torch.float64)
        gaps = torch.stack([gap.sum(), ok64.sum(), ((gap < margin).to(torch.float64) * ok64).sum()])
    else:
        gaps = torch.zeros(3, dtype=torch.float64, device=logits.device)
    tokens = torch.full((1,), float(t), dtype=torch.float64, device=logits.device)
    return torch.cat([tokens, load, chose, weight, gaps, changed])


def _bias_changed(router: Router, module: nn.Module, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """How many tokens' chosen set differs from the router's choice with its bias at zero (groups kept)."""
    if router.bias is None:
        return torch.zeros(1, dtype=torch.float64, device=logits.device)
    plain = choose(router, module, logits, with_bias=False)
    e = logits.shape[1]
    a = torch.zeros(logits.shape[0], e, dtype=torch.bool, device=logits.device).scatter_(1, idx, True)
    b = torch.zeros_like(a).scatter_(1, plain, True)
    return (a != b).any(1).to(torch.float64).sum().reshape(1)


class RouterDispatch(Quantity):
    """Per-window dispatch sums and expert bias of every sparse router (see the module docstring)."""

    name = "routers"

    def __init__(self, ctx: CaptureContext, indices: list[int]) -> None:
        self.ctx = ctx
        self.indices = indices
        self.slots = {f"{i}": Reduction.SUM for i in indices}
        self._open: dict[int, torch.Tensor] = {}  # gate -> sums of the open window
        self._closed: dict[int, list[torch.Tensor | None]] = {i: [] for i in indices}
        self._bias: dict[int, list[torch.Tensor]] = {i: [] for i in indices}
        self._handles = [ctx.gates[i].module.register_forward_hook(self._hook(i)) for i in indices]

    def _hook(self, index: int) -> Callable[..., None]:
        gate = self.ctx.gates[index]
        router = gate.router
        assert router is not None

        def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            if not module.training:
                return
            sums = dispatch_sums(router, module, output, self.ctx.margin)
            have = self._open.get(index)
            self._open[index] = sums if have is None else have + sums

        return hook

    def on_window(self, step: int) -> None:
        for i in self.indices:
            sums = self._open.pop(i, None)
            self._closed[i].append(sums)
            bias = self.ctx.gates[i].router.bias_of(self.ctx.gates[i].module)  # type: ignore[union-attr]
            if bias is not None:
                self._bias[i].append(bias.detach().to(torch.float64).clone())

    def collect(self, windows: list[int]) -> dict[str, State]:
        n = len(windows)
        states: dict[str, State] = {}
        for i in self.indices:
            closed, self._closed[i] = self._closed[i][:n], self._closed[i][n:]
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
