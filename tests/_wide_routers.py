"""A stack of sparse routers and nothing else, for tests of many layers x many experts: each layer a softmax top-k
router over its own logits, which favour a few experts (so some experts are dead)."""

from __future__ import annotations

import torch
from torch import nn

import gatewatch as gw


class Layer(nn.Module):
    """One router: a linear map to ``experts`` logits plus a fixed per-expert bias drawn from ``seed``."""

    def __init__(self, seed: int, in_dim: int, experts: int, spec: gw.Router) -> None:
        super().__init__()
        self.spec = spec
        self.proj = nn.Linear(in_dim, experts)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("favour", torch.randn(experts, generator=g) * 3)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.proj(h) + self.favour
        idx = self.spec.choose(self, logits.detach())
        return logits, self.spec.weights_of(logits, idx), idx


class WideRouters(nn.Module):
    """``layers`` routers fed the same input; the output is a scalar that depends on every router's weights."""

    def __init__(self, layers: int, in_dim: int, experts: int, spec: gw.Router) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(i, in_dim, experts, spec) for i in range(layers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = h.new_zeros(())
        for layer in self.layers:
            logits, w, _ = layer(h)
            out = out + (w.sum() + logits.mean())
        return out
