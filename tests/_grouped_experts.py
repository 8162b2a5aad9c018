"""A torchtitan-style sparse MoE for tests: a top-k router and grouped experts whose weights are ``[E, ...]``
parameters (``w1``/``w3`` ``[E, hidden, dim]``, ``w2`` ``[E, dim, hidden]``), a few such layers, and one head per
task. Small enough for CPU; the layers and their shapes follow torchtitan's ``GroupedExperts``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ["a", "b"]


class TopKRouter(nn.Module):
    """Softmax over the expert logits, then the top k: returns ``(logits [T, E], weights [T, k], indices [T, k])``."""

    def __init__(self, dim: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.randn(n_experts, dim) * 0.3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        weights, indices = torch.softmax(logits, -1).topk(self.top_k, -1)
        return logits, weights, indices


class GroupedExperts(nn.Module):
    """E SwiGLU experts held as three ``[E, ...]`` parameters; each token runs through its k chosen experts."""

    def __init__(self, dim: int, hidden: int, n_experts: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n_experts, hidden, dim) / dim**0.5)
        self.w2 = nn.Parameter(torch.randn(n_experts, dim, hidden) / hidden**0.5)
        self.w3 = nn.Parameter(torch.randn(n_experts, hidden, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            token, slot = torch.where(indices == e)
            if not len(token):
                continue
            h = x[token]
            y = (F.silu(h @ self.w1[e].T) * (h @ self.w3[e].T)) @ self.w2[e].T
            out.index_add_(0, token, y * weights[token, slot, None])
        return out


class MoELayer(nn.Module):
    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.router = TopKRouter(dim, n_experts, top_k)
        self.experts = GroupedExperts(dim, hidden, n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, weights, indices = self.router(x)
        return x + self.experts(x, indices, weights)


class GroupedMoE(nn.Module):
    """Input projection, ``n_layers`` MoE layers, one linear head per task (``tasks``)."""

    def __init__(self, in_dim: int = 6, dim: int = 8, hidden: int = 12, n_experts: int = 4, top_k: int = 2,
                 n_layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tasks = list(TASKS)
        self.embed = nn.Linear(in_dim, dim)
        self.layers = nn.ModuleList(MoELayer(dim, hidden, n_experts, top_k) for _ in range(n_layers))
        self.heads = nn.ModuleDict({t: nn.Linear(dim, 1) for t in self.tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return {t: head(h).squeeze(-1) for t, head in self.heads.items()}


def batch(step: int, n: int = 32, in_dim: int = 6) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Inputs and one regression target per task (the tasks want different functions of the input)."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(n, in_dim, generator=g)
    return x, {"a": x[:, 0] + x[:, 1], "b": x[:, 2] * x[:, 0] - x[:, 1]}


def losses(model: GroupedMoE, step: int) -> dict[str, torch.Tensor]:
    """Each task's mean squared error on the batch of ``step``."""
    x, y = batch(step, in_dim=model.embed.in_features)
    out = model(x.to(model.embed.weight.device))
    return {t: F.mse_loss(out[t], y[t].to(out[t].device)) for t in model.tasks}
