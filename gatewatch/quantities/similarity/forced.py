"""Every fused expert's output on the same probe rows, from the fused module itself with the routing forced.

The fused module is called (``module.forward``, so no hook runs again) on the first ``rows`` rows of the input it
was just given, each row sent to every expert with weight 1, so each architecture's own activation, biases and
clamps apply. Three ways of calling fused experts are understood, told apart by the call just seen:

* ``(hidden [T, H], top_k_index [T, k] int, top_k_weights [T, k])``: transformers 5's ``*Experts`` modules
  (GPT-OSS's ``router_indices`` / ``routing_weights`` too) and torchtitan-style modules taking the routing;
  the probe rows are repeated once per expert with ``top_k_index = e`` and weight 1 (k = 1);
* ``(hidden [T, H], tokens_per_expert [E] int)``: torchtitan's ``GroupedExperts`` (rows grouped by expert);
  the rows are repeated once per expert, ``rows`` tokens each;
* ``(inputs [N, ...])`` returning one output per expert along a dimension of size E (a batched einsum): every
  expert already sees every row.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class CannotForce(ValueError):
    """The fused module is called in a way whose routing cannot be forced; the message says how it was called."""


def _shapes(args: tuple[Any, ...]) -> str:
    return ", ".join(f"{tuple(a.shape)} {str(a.dtype).removeprefix('torch.')}" if isinstance(a, torch.Tensor)
                     else type(a).__name__ for a in args)


def _integer(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex()


def forced_outputs(module: nn.Module, args: tuple[Any, ...], n_experts: int, rows: int) -> torch.Tensor:
    """``[E, n, d]``: expert e's output on the first ``n <= rows`` rows of ``args[0]``; see the module docstring."""
    if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        raise CannotForce(f"{type(module).__name__} was called without a floating-point tensor as its first "
                          "positional input")
    x = args[0].detach()
    with torch.no_grad():
        if len(args) == 3 and _integer(args[1]) and isinstance(args[2], torch.Tensor) and args[1].dim() >= 1:
            flat = x.reshape(-1, x.shape[-1])[:rows]
            n = flat.shape[0]
            index = torch.arange(n_experts, device=x.device).repeat_interleave(n).unsqueeze(1).to(args[1].dtype)
            weights = torch.ones(n_experts * n, 1, dtype=args[2].dtype, device=x.device)
            out = module.forward(flat.repeat(n_experts, 1), index, weights)
        elif len(args) == 2 and _integer(args[1]) and args[1].shape == (n_experts,):
            flat = x.reshape(-1, x.shape[-1])[:rows]
            n = flat.shape[0]
            out = module.forward(flat.repeat(n_experts, 1), torch.full_like(args[1], n))
        elif len(args) == 1:
            flat = x[:rows]
            n = flat.shape[0]
            out = module.forward(flat)
            dims = [d for d in range(1, out.dim()) if out.shape[d] == n_experts] if isinstance(out, torch.Tensor) \
                else []
            if not dims or out.shape[0] != n:
                raise CannotForce(f"{type(module).__name__} takes one input but its output has no dimension of "
                                  f"{n_experts} experts after the rows")
            return out.movedim(dims[0], 0).reshape(n_experts, n, -1)
        else:
            raise CannotForce(f"{type(module).__name__} was called with ({_shapes(args)}); gatewatch forces the "
                              "routing of fused experts called as (hidden, top_k_index, top_k_weights), "
                              "(hidden, tokens_per_expert) or (inputs) with an expert dimension in the output")
    if not isinstance(out, torch.Tensor):
        raise CannotForce(f"{type(module).__name__} returned {type(out).__name__}, not a tensor")
    return out.reshape(n_experts, n, -1)
