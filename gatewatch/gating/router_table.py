"""How sparse MoE routers score and dispatch: :class:`Router`, and the table of known router classes.

A :class:`Router` says where a router module's output holds its logits and its chosen experts (indices
``[T, k]`` or a one-hot dispatch mask ``[..., E]`` for capacity routers), how it scores experts
(``softmax``; ``sigmoid`` with an optional expert bias and group limit; ``softmax_topk``: a softmax over
the top-k logits only) and how it weights the chosen ones. From that gatewatch reads:

* the *affinity* (:func:`affinity`): the scores over all experts normalised per token (softmax, or each
  sigmoid score divided by their sum);
* the *choice space* (:func:`choice_scores`): what the router ranks when it picks (scores + bias, -inf
  outside the allowed groups), and the choice recomputed from it (:func:`choose`, :meth:`Router.inject`
  for knock-out and gate dropout).

:data:`KNOWN` maps the router classes of transformers 5 (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek-V3, GLM-4-MoE, GPT-OSS, Switch) to their description, read from each class's ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..validate import positive_int

Scoring = Literal["softmax", "sigmoid", "softmax_topk"]
SCORINGS = ("softmax", "sigmoid", "softmax_topk")


def _first(out: Any) -> torch.Tensor:
    return out[0]


def _second(out: Any) -> torch.Tensor:
    return out[1]


def _third(out: Any) -> torch.Tensor:
    return out[2]


@dataclass(frozen=True)
class Router:
    """How to read a sparse router (``gw.Gate(module, router=gw.Router(...))``).

    Args:
        scoring: ``"softmax"`` (softmax, then top k), ``"sigmoid"`` (sigmoid scores; the choice adds ``bias``
            and keeps ``groups``) or ``"softmax_topk"`` (top k of the logits, softmax over those k).
        top_k: experts per token.
        logits: ``output -> logits [..., E]``.
        indices: ``output -> chosen experts [..., k]`` (integers), or None with ``mask``.
        mask: ``output -> one-hot dispatch mask [..., E]``, a dropped token's row all zero (capacity routers).
        weights: ``output -> the chosen experts' weights [..., k]`` (``[..., 1]`` with ``mask``).
        bias: the name of the module's expert-bias buffer added to the scores when choosing (sigmoid only).
        groups: ``(n_group, topk_group)``: experts form ``n_group`` groups, and each token chooses within the
            ``topk_group`` groups with the largest sum of their two best scores (DeepSeek-V3).
        renormalize: the chosen weights are divided by their sum.
        scale: the chosen weights are multiplied by this (DeepSeek-V3's ``routed_scaling_factor``).
        capacity: tokens per expert and sequence before the rest are dropped (with ``mask``; for ``inject``).
    """

    scoring: Scoring = "softmax"
    top_k: int = 1
    logits: Callable[[Any], torch.Tensor] = _first
    indices: Callable[[Any], torch.Tensor] | None = _third
    mask: Callable[[Any], torch.Tensor] | None = None
    weights: Callable[[Any], torch.Tensor] = _second
    bias: str | None = None
    groups: tuple[int, int] | None = None
    renormalize: bool = False
    scale: float = 1.0
    capacity: int | None = None

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"Router scoring must be one of {SCORINGS}, got {self.scoring!r}.")
        positive_int("top_k", self.top_k, owner="Router")
        if (self.indices is None) == (self.mask is None):
            raise ValueError("Router needs exactly one of indices= (chosen experts [T, k]) and mask= (a one-hot "
                             "dispatch mask [..., E]); pass indices=None with mask=.")
        if self.bias is not None and self.scoring != "sigmoid":
            raise ValueError("Router bias= applies to sigmoid routers only (DeepSeek-V3 style); pass "
                             "scoring='sigmoid' or drop bias=.")

    def bias_of(self, module: nn.Module) -> torch.Tensor | None:
        """The module's expert bias (the live buffer), or None."""
        if self.bias is None:
            return None
        value = getattr(module, self.bias, None)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"Router bias={self.bias!r}: {type(module).__name__} has no tensor of that name.")
        return value

    def choose(self, module: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """The experts this router chooses from ``logits [T, E]`` (bias of ``module`` and groups included),
        ``[T, k]``: a custom router may call it in its own ``forward``."""
        return choose(self, module, logits)

    def weights_of(self, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The weights this router gives its chosen experts ``idx [T, k]``."""
        return chosen_weights(self, logits, idx)

    def dispatch(self, out: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The router's own choice: ``(indices [T, k], None)`` or ``(None, mask [T, E])``."""
        if self.mask is not None:
            m = self.mask(out)
            return None, m.reshape(-1, m.shape[-1])
        assert self.indices is not None
        idx = self.indices(out)
        return idx.reshape(-1, idx.shape[-1]), None

    def inject(self, module: nn.Module, out: Any, new_logits: torch.Tensor) -> Any:
        """The router's output recomputed from ``new_logits`` (knocked-out experts at -inf): chosen experts,
        their weights and, for capacity routers, the dispatch mask."""
        if self.mask is not None:
            return self._inject_capacity(out, new_logits)
        shape = new_logits.shape
        flat = new_logits.reshape(-1, shape[-1])
        idx = choose(self, module, flat)
        weights = chosen_weights(self, flat, idx)
        old_w = out[1]
        weights = weights.reshape(*shape[:-1], self.top_k).to(old_w.dtype)
        items = [new_logits, weights, idx.reshape(*shape[:-1], self.top_k), *list(out[3:])]
        return type(out)(items) if isinstance(out, tuple) else items

    def _inject_capacity(self, out: Any, new_logits: torch.Tensor) -> Any:
        """Switch: top-1 of the softmax, then the first ``capacity`` tokens of each sequence per expert."""
        probs = torch.softmax(new_logits.float(), dim=-1)
        one_hot = nn.functional.one_hot(probs.argmax(-1), num_classes=probs.shape[-1])
        if self.capacity is not None:
            one_hot = one_hot * (torch.cumsum(one_hot, dim=-2) <= self.capacity)
        old_mask, old_probs = out[0], out[1]
        top = probs.max(-1).values.unsqueeze(-1).to(old_probs.dtype)
        return (one_hot.to(old_mask.dtype), top, new_logits, *out[3:])


def affinity(router: Router, logits: torch.Tensor) -> torch.Tensor:
    """Scores over all experts normalised per token to sum 1: the softmax, or sigmoid / its sum."""
    logits = logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits
    if router.scoring == "sigmoid":
        s = torch.sigmoid(logits)
        return s / s.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    return torch.softmax(logits, dim=-1)


def choice_scores(router: Router, module: nn.Module, logits: torch.Tensor, *, with_bias: bool = True,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the router ranks when it chooses, ``[T, E]``: probabilities (softmax), logits (softmax_topk), or
    sigmoid scores plus the bias, -inf outside each token's allowed groups (sigmoid). Masked experts (logits at
    -inf, from knock-out or gate dropout) are -inf and leave their group's score; a token whose allowed groups
    keep fewer than k experts chooses among all groups. ``bias`` (``[E]``, or ``[T, E]``: one per token) stands
    for the module's bias buffer, e.g. its value at an earlier forward pass."""
    if router.scoring == "softmax":
        return torch.softmax(logits.float(), dim=-1)
    if router.scoring == "softmax_topk":
        return logits.float()
    scores = torch.sigmoid(logits.float())
    bias = (bias if bias is not None else router.bias_of(module)) if with_bias else None
    if bias is not None:
        scores = scores + bias.to(scores)
    scores = scores.masked_fill(torch.isneginf(logits), -torch.inf)
    if router.groups is None:
        return scores
    n_group, topk_group = router.groups
    t, e = scores.shape
    size = e // n_group
    top2 = scores.view(t, n_group, size).topk(min(2, size), dim=-1)[0]
    group_scores = torch.where(torch.isfinite(top2), top2, 0.0).sum(-1)  # masked experts (-inf) add nothing
    group_scores = group_scores.masked_fill(torch.isneginf(top2[..., 0]), -torch.inf)  # a group with none left
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(topk_group, dim=-1)[1], True)
    limited = scores.masked_fill(~keep.repeat_interleave(size, dim=1), -torch.inf)
    enough = torch.isfinite(limited).sum(-1, keepdim=True) >= router.top_k  # masking can leave fewer than k
    return torch.where(enough, limited, scores)


def choose(router: Router, module: nn.Module, logits: torch.Tensor, *, with_bias: bool = True) -> torch.Tensor:
    """The top-k experts of each token in the router's choice space, ``[T, k]``."""
    return choice_scores(router, module, logits, with_bias=with_bias).topk(router.top_k, dim=-1)[1]


def chosen_weights(router: Router, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The weights the router gives its chosen experts ``idx``, as its ``forward`` computes them."""
    if router.scoring == "softmax_topk":
        return torch.softmax(logits.float().gather(1, idx), dim=-1)
    scores = torch.sigmoid(logits.float()) if router.scoring == "sigmoid" else torch.softmax(logits.float(), -1)
    w = scores.gather(1, idx)
    if router.renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * router.scale


def _softmax_router(module: nn.Module, renormalize: bool | None = None) -> Router:
    norm = bool(getattr(module, "norm_topk_prob", False)) if renormalize is None else renormalize
    return Router("softmax", int(module.top_k), renormalize=norm)


def _sigmoid_router(module: nn.Module) -> Router:
    return Router("sigmoid", int(module.top_k), bias="e_score_correction_bias",
                  groups=(int(module.num_group), int(module.topk_group)), renormalize=bool(module.norm_topk_prob),
                  scale=float(module.routed_scaling_factor))


KNOWN: dict[str, Callable[[nn.Module], Router]] = {
    "MixtralTopKRouter": lambda m: _softmax_router(m, renormalize=True),
    "Qwen2MoeTopKRouter": _softmax_router,
    "Qwen3MoeTopKRouter": _softmax_router,
    "OlmoeTopKRouter": _softmax_router,
    "DeepseekV3TopkRouter": _sigmoid_router,
    "Glm4MoeTopkRouter": _sigmoid_router,
    "GptOssTopKRouter": lambda m: Router("softmax_topk", int(m.top_k)),
    "SwitchTransformersTop1Router": lambda m: Router(
        "softmax", 1, logits=_third, indices=None, mask=_first, capacity=int(m.expert_capacity)),
}


def known_router(module: nn.Module) -> Router | None:
    """The description of ``module`` when its class is a known router, else None."""
    make = KNOWN.get(type(module).__name__)
    return None if make is None else make(module)


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module, Router]]:
    """Every module of ``model`` whose class is a known router, in module order."""
    out = []
    for path, module in model.named_modules():
        router = known_router(module)
        if router is not None:
            out.append((path, module, router))
    return out


__all__ = ["KNOWN", "Router", "affinity", "choice_scores", "choose", "chosen_weights", "find_routers",
           "known_router"]
