"""Routing stability, capture half: every ``saturation_every`` steps, the routers' top-k sets on a fixed probe batch.

The probe is the batch given as ``saturation_probe`` (a tensor, a tuple of positional inputs, or a dict of keyword
inputs of the model), or else the inputs of the model's first training forward, kept by a one-time forward
pre-hook. On each probe step (and once more at ``close()``, for the final model) :meth:`RoutingStability.probe`
runs it through the model in eval mode under ``no_grad`` and restores every module's training flag after it. The
routers are hooked for that forward only, with PyTorch hooks of their own: the quantities' shared hooks skip
eval-mode forwards, so the probe adds nothing to the training statistics. Each router keeps, for the first
``saturation_tokens`` tokens, its top-k set (sorted) and its top-1 expert (the chosen expert of largest weight; a
capacity router's argmax), as one REPLICATED row per probe (rank 0's probe is written). At the flush the
host compares each snapshot with the one before (``routing_stability``) and keeps every snapshot's sets; at the
last flush it compares every snapshot with the final one (``saturation``, as OLMoE defines it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ...capture.quantity import CaptureContext, Quantity, Reduction, Rows
from ...gating.router_table import Router
from ...gating.specs import ResolvedGate
from ...validate import positive_int
from ...wrappers import unwrap
from .read import SetHistory, set_rows

KEYWORDS: dict[str, Any] = {"saturation_every": 0, "saturation_probe": None, "saturation_tokens": 1024}

Probe = tuple[tuple[Any, ...], dict[str, Any]]


def build(ctx: CaptureContext) -> RoutingStability | None:
    """The routing probe, when ``saturation_every`` is a number of steps (0 or None: off)."""
    every = ctx.options["saturation_every"]
    if not every:
        return None
    every = positive_int("saturation_every", every, unit="steps")
    if "pp" in (getattr(ctx.mesh, "mesh_dim_names", None) or ()):
        raise ValueError("saturation_every is not measured on pipeline stages (a mesh with 'pp'): the probe reruns "
                         "the model's forward on a kept batch, and a stage's module cannot run alone (its input "
                         "comes from the stage before). Leave saturation_every at 0 (the gate and router figures of "
                         "every stage stay exact).")
    tokens = positive_int("saturation_tokens", ctx.options["saturation_tokens"], unit="probe tokens per router")
    routers = [i for i, g in enumerate(ctx.gates) if g.router is not None]
    if not routers:
        raise ValueError("saturation_every needs sparse routers, and this model has none that GateWatch knows: "
                         "declare them with gw.Gate(..., router=gw.Router(...)), or leave saturation_every at 0.")
    return RoutingStability(ctx, routers, every, tokens, as_probe(ctx.options["saturation_probe"]))


def as_probe(value: Any) -> Probe | None:
    """``saturation_probe`` as (positional inputs, keyword inputs) of the model."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return (value,), {}
    if isinstance(value, Mapping):
        return (), dict(value)
    if isinstance(value, (tuple, list)):
        return tuple(value), {}
    raise TypeError(f"saturation_probe takes a tensor, a tuple of the model's positional inputs or a dict of its "
                    f"keyword inputs, got {type(value).__name__}.")


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value


def choice_rows(router: Router, out: Any, tokens: int) -> torch.Tensor:
    """The first ``tokens`` tokens of one router output: each token's top-k set (sorted), then its top-1:
    ``[T, k + 1]``."""
    idx, mask = router.dispatch(out)
    if idx is None:  # a capacity router: the expert each token chose, dropped or not
        assert mask is not None
        top1 = router.logits(out).reshape(-1, mask.shape[-1]).argmax(-1, keepdim=True)
        return torch.cat([top1, top1], dim=1)[:tokens]
    idx = idx[:tokens].long()
    weights = router.weights(out).reshape(-1, idx.shape[-1])[:tokens]
    top1 = idx.gather(1, weights.argmax(-1, keepdim=True))
    return torch.cat([idx.sort(-1).values, top1], dim=1)


class RoutingStability(Quantity):
    """The routers' choice on a fixed probe batch, every ``saturation_every`` steps (see the module docstring)."""

    name = "routing_stability"

    def __init__(self, ctx: CaptureContext, routers: list[int], every: int, tokens: int, probe: Probe | None) -> None:
        self.ctx, self.routers, self.every, self.tokens = ctx, routers, every, tokens
        self.probe_batch = probe
        self._pending: list[int] = []  # probe steps not collected yet
        self._snapshots: dict[int, list[torch.Tensor]] = {i: [] for i in routers}
        self._collected: list[int] = []
        self._last = 0
        self.history = SetHistory()
        for i in routers:
            self.add_state(f"{i}", Reduction.REPLICATED)
        self._grab = None if probe is not None else unwrap(ctx.model).register_forward_pre_hook(
            self._keep_first, with_kwargs=True)

    def _keep_first(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module.training and self.probe_batch is None:
            self.probe_batch = (_detached(args), _detached(kwargs))
            if self._grab is not None:
                self._grab.remove()
                self._grab = None

    @torch.no_grad()
    def probe(self) -> dict[int, torch.Tensor]:
        """Run the probe batch through the model in eval mode; each router's ``[T, k + 1]`` choice rows."""
        assert self.probe_batch is not None
        model = unwrap(self.ctx.model)
        flags = [(m, m.training) for m in model.modules()]
        seen: dict[int, torch.Tensor] = {}
        handles = [g.module.register_forward_hook(self._record(i, g, seen))
                   for i, g in ((i, self.ctx.gates[i]) for i in self.routers)]
        try:
            model.eval()
            args, kwargs = self.probe_batch
            model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            for m, training in flags:
                m.training = training
        return seen

    def _record(self, index: int, gate: ResolvedGate, seen: dict[int, torch.Tensor]) -> Any:
        router = gate.router
        assert router is not None

        def hook(_module: nn.Module, _args: Any, out: Any) -> None:
            if index not in seen:  # a router called twice in one forward: its first call
                seen[index] = choice_rows(router, out, self.tokens)

        return hook

    def on_step(self, step: int) -> None:
        due = step % self.every == 0 or self.ctx.closing
        if not due or step == self._last or self.probe_batch is None:
            return
        self._last = step
        seen = self.probe()
        self._pending.append(step)
        for i in self.routers:
            rows = seen.get(i)
            self._snapshots[i].append(rows if rows is not None else torch.full((0,), float("nan")))

    def collect(self, windows: list[int]) -> dict[str, torch.Tensor]:
        self._collected, self._pending = self._pending, []
        out = {}
        for i in self.routers:
            snaps, self._snapshots[i] = self._snapshots[i], []
            if snaps and all(s.numel() for s in snaps) and len({s.shape for s in snaps}) == 1:
                out[f"{i}"] = torch.stack([s.reshape(-1) for s in snaps])
        return out

    def rows(self, windows: list[int], host: dict[str, np.ndarray]) -> Rows:
        parts: dict[str, list[pd.DataFrame]] = {"routing_stability": [], "routing_sets": []}
        for i in self.routers:
            if f"{i}" not in host:
                continue
            gate = self.ctx.gates[i]
            width = host[f"{i}"].shape[1]
            k = gate.router.top_k if gate.router.indices is not None else 1  # type: ignore[union-attr]
            for step, flat in zip(self._collected, host[f"{i}"], strict=True):
                choice = flat.reshape(width // (k + 1), k + 1).astype(np.int64)
                stable, sets = set_rows(gate.name, step, choice, self.history)
                parts["routing_stability"].append(stable)
                parts["routing_sets"].append(sets)
        out: Rows = {name: pd.concat(dfs, ignore_index=True) for name, dfs in parts.items() if dfs}
        if self.ctx.closing:
            final = self.history.saturation()
            if len(final):
                out["saturation"] = final
        return out

    def describe(self) -> dict[str, Any]:
        return {"routing_stability": {"every": self.every, "tokens": self.tokens,
                                      "probe": "given" if self.ctx.options["saturation_probe"] is not None
                                      else "first batch", "probed": self.probe_batch is not None,
                                      "gates": [self.ctx.gates[i].name for i in self.routers]}}

    def detach(self) -> None:
        super().detach()
        if self._grab is not None:
            self._grab.remove()
            self._grab = None
