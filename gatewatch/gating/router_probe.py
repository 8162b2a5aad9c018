"""Sparse routers outside the table of known classes, recognised by what they return.

A module is a candidate when its dotted path or class name says ``router``, ``routing``, ``gate`` or ``gating``,
it is not a plain ``nn.Linear``, an MLP projection (``gate_proj``, ``up_proj``, ``down_proj``) or Qwen2-MoE's
``shared_expert_gate``, and it owns at most :data:`MAX_PARAMETERS` parameter tensors, exactly one of them 2-D
(its weight, ``[E, hidden]`` or ``[hidden, E]``). Each candidate is probed once: a deep copy of it (its hooks
left out, in eval mode, its 2-D weight redrawn at random so the logits spread, under ``torch.no_grad`` with the
random state restored afterwards) is called on 16 random tokens; the live module is never called or changed.
It is a router when the copy returns ``(logits [T, E], weights [T, k], indices [T, k])`` with integer indices
in ``[0, E)`` (leading dimensions flattened).

The scoring is read from the probe's weights: the softmax or the sigmoid of the logits gathered at the indices,
renormalised or not, up to a constant scale (DeepSeek-V3's ``routed_scaling_factor``). A softmax over the
top-k logits equals the renormalised softmax gathered at those k, and is read as that. A 1-D buffer of E values
whose name contains ``bias`` is a sigmoid router's expert bias. When the weights fit no scoring, or fit both a
softmax and a sigmoid, or the indices are not the top k of the inferred choice space (a group limit, a bias on
a softmax), the router is still read and :attr:`Probed.doubt` says so, with the ``gw.Gate(...)`` to pass. Its
dispatch load always comes from its own indices, so an unrecognised choice rule never changes the load; only
the top-k margin, and the choice that knock-out and gate dropout recompute, follow the inferred rule.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any, NamedTuple

import torch
from torch import nn

from .router_table import Router, Scoring, choose, known_router

ROUTER_NAME = re.compile(r"gate|gating|router|routing", re.IGNORECASE)
# SwiGLU projections and Qwen2-MoE's one-output gate, and anything inside them (a LoRA-wrapped gate_proj)
MLP_PROJECTION = re.compile(r"((gate|up|down)_proj|shared_expert_gate)(\.|$)")
MAX_PARAMETERS = 4
PROBE_TOKENS = 16
_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
          "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


class Probed(NamedTuple):
    """A router recognised by its output: its path, the live module, how to read it, and any doubt."""

    path: str
    module: nn.Module
    router: Router
    doubt: str | None = None


def named_like_router(path: str, class_name: str = "") -> bool:
    """Whether ``path`` (or ``class_name``) names a gate or router that is neither an MLP projection nor a
    Qwen2-MoE ``shared_expert_gate``, nor inside one."""
    named = ROUTER_NAME.search(path) is not None or ROUTER_NAME.search(class_name) is not None
    return named and MLP_PROJECTION.search(path) is None


def router_hint(path: str, router: Router) -> str:
    """The ``gw.Gate(...)`` that states ``router`` for the module at ``path``."""
    extra = "".join([f', bias="{router.bias}"' if router.bias else "",
                     ", renormalize=True" if router.renormalize else "",
                     f", scale={router.scale:g}" if router.scale != 1.0 else ""])
    return f'gw.Gate("{path}", router=gw.Router(scoring="{router.scoring}", top_k={router.top_k}{extra}))'


def structural_routers(model: nn.Module) -> list[Probed]:
    """Every module of ``model`` outside the known classes that returns ``(logits, weights, indices)``, in module
    order; a module inside one already found is not probed."""
    found: list[Probed] = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(p.path + ".") for p in found):
            continue
        if type(module) is nn.Linear or known_router(module) is not None:
            continue
        if not named_like_router(path, type(module).__name__):
            continue
        probed = probe_router(path, module)
        if probed is not None:
            found.append(probed)
    return found


def probe_router(path: str, module: nn.Module) -> Probed | None:
    """``module`` read as a sparse router from one call of a copy of it, or None when it is not one."""
    weight = _weight(module)
    if weight is None:
        return None
    widths = list(dict.fromkeys([weight.shape[1], weight.shape[0]]))
    for width in widths:
        try:
            twin, out = _call_copy(module, width)
            parts = _structure(out, weight.shape)
        except Exception:  # a module that cannot take [T, width] tokens is not a router of that width
            continue
        if parts is not None:
            return _describe(path, module, twin, *parts)
    return None


def _weight(module: nn.Module) -> nn.Parameter | None:
    """The module's single 2-D parameter when it owns at most MAX_PARAMETERS tensors, else None."""
    params = list(module.parameters())
    if not params or len(params) > MAX_PARAMETERS:
        return None
    two_d = [p for p in params if p.dim() == 2]
    if len(two_d) != 1 or min(two_d[0].shape) < 2 or not two_d[0].is_floating_point():
        return None
    return two_d[0]


def _call_copy(module: nn.Module, width: int) -> tuple[nn.Module, Any]:
    """A copy of ``module`` (no hooks, eval mode, 2-D weight redrawn) and its output on random tokens."""
    memo: dict[int, Any] = {}
    for m in module.modules():  # hooks stay with the live module: the copy gets empty registries
        for name in _HOOKS:
            hooks = getattr(m, name, None)
            if isinstance(hooks, dict):
                memo[id(hooks)] = type(hooks)()
    twin = copy.deepcopy(module, memo)
    twin.eval()
    weight = _weight(twin)
    assert weight is not None
    gen = torch.Generator().manual_seed(0)
    devices = [weight.device] if weight.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        weight.copy_(torch.randn(weight.shape, generator=gen) / math.sqrt(width))
        x = torch.randn(PROBE_TOKENS, width, generator=gen).to(device=weight.device, dtype=weight.dtype)
        return twin, twin(x)


def _structure(out: Any, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(logits [T, E], weights [T, k], indices [T, k])`` from a router-like output, else None."""
    if not isinstance(out, (tuple, list)) or len(out) < 3:
        return None
    logits, weights, idx = out[0], out[1], out[2]
    if not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in (logits, weights, idx)):
        return None
    e, k = logits.shape[-1], idx.shape[-1]
    if e not in shape or e < 2 or not 1 <= k <= e or weights.shape != idx.shape:
        return None
    if not (logits.is_floating_point() and weights.is_floating_point()):
        return None
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        return None
    logits, weights, idx = logits.reshape(-1, e), weights.reshape(-1, k), idx.reshape(-1, k)
    if not len(logits) == len(idx) == PROBE_TOKENS or not bool(((idx >= 0) & (idx < e)).all()):
        return None
    return logits.detach(), weights.detach(), idx.detach().long()


def _describe(path: str, module: nn.Module, twin: nn.Module, logits: torch.Tensor, weights: torch.Tensor,
              idx: torch.Tensor) -> Probed:
    """The router's description from one probe, and a doubt when a part of it is a guess."""
    e, k = logits.shape[-1], idx.shape[-1]
    fits = _scorings(logits, weights, idx)
    doubts: list[str] = []
    if not fits:
        scoring, renormalize, scale = "softmax", False, 1.0
        doubts.append("its weights match no softmax or sigmoid of its logits gathered at its indices (renormalised "
                      "or not, up to a constant scale), so its affinity is read as a softmax")
    else:
        scoring, renormalize, scale = fits[0]
        if len({s for s, _, _ in fits}) > 1:
            doubts.append("its weights fit both a softmax and a sigmoid scoring, so it is read as a softmax")
    bias = _bias_name(module, e) if scoring == "sigmoid" else None
    router = Router(scoring, k, bias=bias, renormalize=renormalize, scale=scale)
    if fits and not _chooses_top_k(router, twin, logits, idx):
        space = "sigmoid scores + bias" if bias else f"{scoring} scores"
        doubts.append(f"its chosen experts are not the top {k} of its {space} (a group limit?): the top-k margin is "
                      "measured, and knock-out and gate dropout recompute the choice, as that top k")
    doubt = None
    if doubts:
        doubt = (f"gatewatch reads {path!r} ({type(module).__name__}) as a sparse router (it returns logits, weights "
                 f"and indices; E={e}, k={k}), but {'; and '.join(doubts)}. Its dispatch load is read from its own "
                 f"indices. If it routes otherwise, state it: gates={{\"{path}\": {router_hint(path, router)}}}, "
                 "with groups=(n_group, topk_group) for a group limit.")
    return Probed(path, module, router, doubt)


def _scorings(logits: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> list[tuple[Scoring, bool, float]]:
    """The ``(scoring, renormalize, scale)`` that reproduce ``weights``: exact ones when any, else those off by a
    constant factor; softmax before sigmoid, plain before renormalised."""
    z, w = logits.double(), weights.double()
    eps = max(torch.finfo(logits.dtype).eps, torch.finfo(weights.dtype).eps)
    rtol, atol = max(1e-4, 4 * eps), max(1e-6, eps)
    soft, sig = torch.softmax(z, -1).gather(1, idx), torch.sigmoid(z).gather(1, idx)
    candidates: list[tuple[Scoring, bool, torch.Tensor]] = [
        ("softmax", False, soft), ("softmax", True, soft / (soft.sum(-1, keepdim=True) + 1e-20)),
        ("sigmoid", False, sig), ("sigmoid", True, sig / (sig.sum(-1, keepdim=True) + 1e-20))]
    exact = [(s, r, 1.0) for s, r, c in candidates if torch.allclose(w, c, rtol=rtol, atol=atol)]
    if exact:
        return exact
    scaled = []
    for s, r, c in candidates:
        factor = float(w.sum() / c.sum())
        if math.isfinite(factor) and factor > 0 and torch.allclose(w, c * factor, rtol=rtol, atol=atol):
            scaled.append((s, r, float(f"{factor:.6g}")))
    return scaled


def _bias_name(module: nn.Module, e: int) -> str | None:
    """The name of the module's own 1-D float buffer of ``e`` values named like a bias, if any."""
    for name, buf in module.named_buffers(recurse=False):
        if "bias" in name.lower() and buf.dim() == 1 and buf.numel() == e and buf.is_floating_point():
            return name
    return None


def _chooses_top_k(router: Router, twin: nn.Module, logits: torch.Tensor, idx: torch.Tensor) -> bool:
    """Whether ``idx`` is, per token, the top k of the router's choice space (as a set)."""
    mine = choose(router, twin, logits.float())
    return torch.equal(mine.sort(-1).values, idx.sort(-1).values)


__all__ = ["MLP_PROJECTION", "ROUTER_NAME", "Probed", "named_like_router", "probe_router", "router_hint",
           "structural_routers"]
