"""Co-activation, capture half: per router and window, how many tokens chose each pair of experts together.

The gate's forward hook (shared with the other quantities) copies the router's chosen experts ``[T, k]`` into a
:class:`~gatewatch.capture.window_buffer.WindowBuffer`. At the flush (or once ``HOLD_ELEMENTS`` choices are
held) each router's passes are counted in one batched pass on the device: every ordered pair ``(a, b)`` of each
token's top-k (the pair with itself included) adds 1 at ``a * E + b`` of the window's ``E * E`` counts
(``index_add_``; on the CPU at E = 128 and k = 8 as fast as a one-hot matrix product, and exact). ``collect``
keeps the upper triangle, the diagonal included (the diagonal counts the tokens that chose each expert), and
the window's token count: ``E (E + 1) / 2 + 1`` floats per router and window, summed over ranks (SUM). No host
sync between flushes. Routers with one expert per token, or a capacity router's dispatch mask, have no pairs and
are left out (the read half's ``skipped`` says so).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from ...capture.gate_hooks import HookCall
from ...capture.quantity import CaptureContext, Quantity, Reduction, Rows
from ...capture.window_buffer import Slot, WindowBuffer
from ...validate import positive_int
from .read import TOP_PAIRS, pair_rows

KEYWORDS: dict[str, Any] = {"coactivation": True, "coactivation_full_every": 100, "coactivation_top": TOP_PAIRS}
HOLD_ELEMENTS = 4_000_000  # chosen experts held until the flush; above: fold early


def build(ctx: CaptureContext) -> Coactivation | None:
    """The co-activation quantity, when the model has sparse routers (``coactivation=False``: off). It counts the
    routers that choose two experts or more per token by index; run.json lists them, and the others are skipped."""
    if not ctx.options["coactivation"]:
        return None
    full_every = positive_int("coactivation_full_every", ctx.options["coactivation_full_every"], unit="windows")
    top = positive_int("coactivation_top", ctx.options["coactivation_top"], unit="pairs per layer")
    if not any(g.router is not None for g in ctx.gates):
        return None
    routers = [i for i, g in enumerate(ctx.gates)
               if g.router is not None and g.router.indices is not None and g.router.top_k >= 2]
    return Coactivation(ctx, routers, full_every, top)


class Coactivation(Quantity):
    """Pair counts of every router that chooses two experts or more per token (see the module docstring)."""

    name = "coactivation"

    def __init__(self, ctx: CaptureContext, indices: list[int], full_every: int, top: int) -> None:
        self.ctx, self.indices, self.full_every, self.top = ctx, indices, full_every, top
        self.experts: dict[int, int] = {}  # router -> E, from its first output
        self.windows = 0  # windows turned into rows so far (the first, and every full_every-th, keep the matrix)
        for i in indices:
            self.add_state(f"{i}", Reduction.SUM)
        self.buffer = WindowBuffer(self, ctx, self._reduce, hold_elements=HOLD_ELEMENTS)
        for i in indices:
            self.hook_gate(ctx.gates[i], self._hook(i))

    def _hook(self, index: int) -> Any:
        router = self.ctx.gates[index].router
        assert router is not None

        def hook(call: HookCall) -> None:
            idx, _ = router.dispatch(call.output)
            assert idx is not None
            if index not in self.experts:
                self.experts[index] = int(router.logits(call.output).shape[-1])
            self.buffer.hold((index, idx.detach().clone()), idx.numel() * idx.shape[-1])

        return hook

    def _reduce(self, held: list[tuple[Slot, int, tuple[int, torch.Tensor]]]
                ) -> list[tuple[str, list[Slot], torch.Tensor]]:
        """Every held pass counted into its window's pairs: one batched ``index_add_`` per router."""
        by_router: dict[int, list[tuple[Slot, torch.Tensor]]] = {}
        for slot, _, (i, idx) in held:
            by_router.setdefault(i, []).append((slot, idx))
        out = []
        for i, passes in by_router.items():
            slots = sorted({slot for slot, _ in passes})
            at = {slot: j for j, slot in enumerate(slots)}
            idx = torch.cat([p.reshape(-1, p.shape[-1]) for _, p in passes]).long()
            dev, e, n = idx.device, self.experts[i], len(slots)
            win = torch.repeat_interleave(torch.tensor([at[s] for s, _ in passes], device=dev),
                                          torch.tensor([p.reshape(-1, p.shape[-1]).shape[0] for _, p in passes],
                                                       device=dev), output_size=len(idx))
            pairs = (win[:, None, None] * (e * e) + idx[:, :, None] * e + idx[:, None, :]).reshape(-1)
            f64: dict[str, Any] = {"dtype": torch.float64, "device": dev}
            counts = torch.zeros(n * e * e, **f64).index_add_(0, pairs, torch.ones(pairs.numel(), **f64))
            tokens = torch.zeros(n, **f64).index_add_(0, win, torch.ones(len(idx), **f64))
            out.append((f"{i}", slots, torch.cat([counts.view(n, e * e), tokens[:, None]], dim=1)))
        return out

    def on_window(self, step: int) -> None:
        self.buffer.on_window(step)

    def collect(self, windows: list[int]) -> dict[str, torch.Tensor]:
        states = self.buffer.collect(len(windows))
        out = {}
        for key, rows in states.items():
            e = self.experts[int(key)]
            a, b = torch.triu_indices(e, e, device=rows.device)
            out[key] = torch.cat([rows[:, a * e + b], rows[:, -1:]], dim=1)  # upper triangle + tokens
        return out

    def rows(self, windows: list[int], host: dict[str, np.ndarray]) -> Rows:
        full_rows, top_rows = [], []
        for w, step in enumerate(windows):
            ordinal = self.windows + w
            full = ordinal % self.full_every == 0 or (self.ctx.closing and w == len(windows) - 1)
            for i in self.indices:
                if f"{i}" not in host:
                    continue
                gate = self.ctx.gates[i]
                counts = host[f"{i}"][w]
                whole, top = pair_rows(gate.name, int(step), counts, self.top, full=full)
                top_rows.append(top)
                if whole is not None:
                    full_rows.append(whole)
        self.windows += len(windows)
        out: Rows = {}
        if top_rows:
            out["coactivation_top"] = pd.concat(top_rows, ignore_index=True)
            if full_rows:
                out["coactivation"] = pd.concat(full_rows, ignore_index=True)
        return out

    def describe(self) -> dict[str, Any]:
        return {"coactivation": {"full_every": self.full_every, "top": self.top,
                                 "gates": [self.ctx.gates[i].name for i in self.indices]}}

    def detach(self) -> None:
        super().detach()
        self.buffer.clear()
