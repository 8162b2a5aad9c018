"""Router dispatch maths on the device: the forward passes of one router held since the last fold, reduced to
per-window sums (the layout of :class:`~gatewatch.quantities.routers.read.Sums`) in one batched pass.

A forward hook only copies the router's logits, its choice (indices, or a capacity router's dispatch mask),
the chosen weights and the expert bias of that moment into a :class:`Held` record (copies: a model that edits
its router's outputs in place later does not change what is counted). :func:`window_sums` then turns all
held records of a router into one row of sums per window: the number of tokens, the dispatch count of each
expert read from the router's own choice, the count of tokens that chose each expert before capacity dropped
some, the dispatch weight per expert, the top-k boundary margin in the choice space of each pass (with the
bias it had then), and the tokens whose chosen set differs from the choice with the bias at zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...gating.router_table import Router, choice_scores, choose


@dataclass
class Held:
    """One forward pass of a router: its window, logits ``[T, E]``, choice and weights, and expert bias."""

    window: int
    logits: torch.Tensor
    idx: torch.Tensor | None  # [T, k] chosen experts (or None with mask)
    mask: torch.Tensor | None  # [T, E] a capacity router's dispatch mask (a dropped token's row all zero)
    weights: torch.Tensor  # [T, k] (or [T, 1] with mask)
    bias: torch.Tensor | None  # [E] the expert bias at this pass

    @classmethod
    def read(cls, router: Router, module: nn.Module, out: Any, window: int) -> Held:
        """Copy what the sums need out of the router's output ``out``."""
        logits = router.logits(out).detach()
        idx, mask = router.dispatch(out)
        bias = router.bias_of(module)
        return cls(window, logits.reshape(-1, logits.shape[-1]).clone(),
                   None if idx is None else idx.detach().clone(), None if mask is None else mask.detach().clone(),
                   router.weights(out).detach().clone(), None if bias is None else bias.detach().clone())


def window_sums(router: Router, module: nn.Module, held: list[Held], margin: float
                ) -> tuple[list[int], torch.Tensor]:
    """The windows of ``held`` (sorted) and their sums ``[windows, 3E + 5]`` (float64, on the device)."""
    windows = sorted({h.window for h in held})
    at = {w: j for j, w in enumerate(windows)}
    logits = torch.cat([h.logits for h in held]).float()
    t, e = logits.shape
    dev, n = logits.device, len(windows)
    f64: dict[str, Any] = {"dtype": torch.float64, "device": dev}
    win = torch.repeat_interleave(torch.tensor([at[h.window] for h in held], device=dev),
                                  torch.tensor([len(h.logits) for h in held], device=dev), output_size=t)
    ones = torch.ones(t, **f64)
    tokens = torch.zeros(n, **f64).index_add_(0, win, ones)
    if router.mask is not None:  # capacity router: the mask holds what was kept, the argmax what was chosen
        mask = torch.cat([h.mask for h in held if h.mask is not None]).reshape(t, e).to(torch.float64)
        load = torch.zeros(n, e, **f64).index_add_(0, win, mask)
        chose = torch.zeros(n * e, **f64).index_add_(0, win * e + logits.argmax(-1), ones).view(n, e)
        w = torch.cat([h.weights.reshape(-1, 1) for h in held]).to(torch.float64)
        weight = torch.zeros(n, e, **f64).index_add_(0, win, mask * w)
        changed = torch.zeros(n, **f64)
    else:
        idx = torch.cat([h.idx.reshape(-1, h.idx.shape[-1]) for h in held if h.idx is not None]).long()
        flat = (win.unsqueeze(1) * e + idx).reshape(-1)
        load = torch.zeros(n * e, **f64).index_add_(0, flat, torch.ones(flat.numel(), **f64)).view(n, e)
        chose = load
        w = torch.cat([h.weights.reshape(-1) for h in held]).to(torch.float64)
        weight = torch.zeros(n * e, **f64).index_add_(0, flat, w).view(n, e)
        changed = torch.zeros(n, **f64).index_add_(0, win, _bias_changed(router, module, logits, idx))
    bias = None
    if router.bias is not None and all(h.bias is not None for h in held):
        bias = torch.cat([h.bias.to(logits).expand(len(h.logits), e) for h in held if h.bias is not None])
    k = router.top_k
    if k < e:
        vals = choice_scores(router, module, logits, bias=bias).topk(k + 1, dim=-1)[0]
        gap = vals[:, k - 1] - vals[:, k]
        ok = torch.isfinite(gap)
        gap = torch.where(ok, gap, 0.0).to(torch.float64)
        ok64 = ok.to(torch.float64)
        gaps = torch.zeros(n, 3, **f64).index_add_(0, win, torch.stack([gap, ok64, (gap < margin) * ok64], 1))
    else:
        gaps = torch.zeros(n, 3, **f64)
    return windows, torch.cat([tokens[:, None], load, chose, weight, gaps, changed[:, None]], dim=1)


def _bias_changed(router: Router, module: nn.Module, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per token (float64): 1 where its chosen set differs from the router's choice with its bias at zero (groups
    kept), else 0."""
    if router.bias is None:
        return torch.zeros(len(logits), dtype=torch.float64, device=logits.device)
    plain = choose(router, module, logits, with_bias=False)
    a = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(1, idx, True)
    b = torch.zeros_like(a).scatter_(1, plain, True)
    return (a != b).any(1).to(torch.float64)
