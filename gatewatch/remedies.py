"""Remedies for unhealthy multi-task MoE gates, usable in any PyTorch model.

The seeds name these fixes; each one here is a plain ``nn.Module`` or function (the remedy texts that findings
print, which tell users to type these, are the quantities' ``remedy_texts``: :data:`gatewatch.findings.REMEDY_TEXTS`):

- :class:`GateDropout` - YouTube's "10% probability of setting utilization of experts to 0 and
  re-normalizing" (Zhao et al., RecSys 2019), applied to gate probabilities.
- :class:`TemperatureSoftmax` - ``softmax(x / T)``; a subclass of ``nn.Softmax`` so that gate
  auto-discovery (which looks for ``nn.Softmax`` modules) still finds it.
- :func:`init_gate_` - small-variance gate initialisation (near-uniform gates at the start).
- :func:`make_gate` - ``Linear -> [LayerNorm] -> Softmax -> [GateDropout]``, the gate used by the
  reference models in :mod:`gatewatch.models`; the LayerNorm sits before the softmax.
- :class:`GateFreezer` - stop gate updates from a given step on.
- :class:`UncertaintyWeighting` - learnable task-loss weights (Kendall et al., CVPR 2018).

Put :class:`GateDropout` *after* the softmax: monitoring hooks on the softmax then see the gate's own
distribution, and the dropout only changes what the experts' mixture receives.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .validate import dropout_rate, non_negative_int

__all__ = [
    "GateDropout",
    "GateFreezer",
    "TemperatureSoftmax",
    "UncertaintyWeighting",
    "init_gate_",
    "make_gate",
]


class GateDropout(nn.Module):
    """Drop experts from gate probabilities ``[..., E]`` and renormalise each row to sum 1.

    In training mode every expert of every row is masked independently with probability ``p``.
    A row that would keep no probability mass (all experts masked, or only experts whose
    probability is exactly 0 kept) keeps its argmax expert instead, so no row is ever all-zero and
    no division by zero happens. The argmax is chosen (not a random expert) because it always has
    positive mass. Masking and renormalising equals setting the masked logits to ``-inf``.
    Identity in eval mode and when ``p == 0``.
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.p = dropout_rate("p", p, owner="GateDropout")

    def forward(self, probs: Tensor) -> Tensor:
        """Return the masked, renormalised probabilities (or ``probs`` itself when inactive)."""
        if not self.training or self.p == 0.0:
            return probs
        keep = torch.rand_like(probs) >= self.p
        kept = probs * keep
        empty = kept.sum(dim=-1, keepdim=True) <= 0
        top = F.one_hot(probs.argmax(dim=-1), probs.shape[-1]).to(probs.dtype)
        kept = torch.where(empty, probs * top, kept)
        return kept / kept.sum(dim=-1, keepdim=True)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class TemperatureSoftmax(nn.Softmax):
    """``softmax(x / temperature)`` along ``dim``; T < 1 sharpens the gate, T > 1 flattens it."""

    def __init__(self, dim: int = -1, temperature: float = 1.0) -> None:
        super().__init__(dim=dim)
        if not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(
                f"TemperatureSoftmax: temperature must be a finite number > 0, got {temperature!r}"
            )
        self.temperature = float(temperature)

    def forward(self, input: Tensor) -> Tensor:
        return F.softmax(input / self.temperature, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, temperature={self.temperature}"


def init_gate_(linear: nn.Linear, std: float = 1e-3) -> nn.Linear:
    """Initialise a gate's Linear in place: weights ~ N(0, std^2), bias 0. Returns ``linear``."""
    if not std >= 0:
        raise ValueError(f"init_gate_: std must be >= 0, got {std!r}")
    with torch.no_grad():
        linear.weight.normal_(0.0, std)
        if linear.bias is not None:
            linear.bias.zero_()
    return linear


def make_gate(
    in_dim: int,
    n_experts: int,
    *,
    temperature: float = 1.0,
    layernorm: bool = False,
    dropout: float = 0.0,
    init_std: float | None = None,
) -> nn.Sequential:
    """Build ``Sequential(Linear, [LayerNorm], Softmax, [GateDropout])`` producing ``[N, n_experts]``.

    The softmax is a plain ``nn.Softmax`` when ``temperature == 1`` and a :class:`TemperatureSoftmax`
    otherwise. ``init_std`` (if given) applies :func:`init_gate_` to the Linear.
    """
    linear = nn.Linear(in_dim, n_experts)
    if init_std is not None:
        init_gate_(linear, init_std)
    layers: list[nn.Module] = [linear]
    if layernorm:
        layers.append(nn.LayerNorm(n_experts))
    layers.append(nn.Softmax(dim=-1) if temperature == 1.0 else TemperatureSoftmax(-1, temperature))
    if dropout != 0:
        layers.append(GateDropout(dropout))
    return nn.Sequential(*layers)


def _collect_parameters(modules_or_params: nn.Module | nn.Parameter | Iterable) -> list[nn.Parameter]:
    """Flatten modules / parameters (or an iterable of them) into a list of unique parameters."""
    items = [modules_or_params] if isinstance(modules_or_params, (nn.Module, Tensor)) else modules_or_params
    params: dict[int, nn.Parameter] = {}
    for item in items:
        if isinstance(item, nn.Module):
            params.update((id(p), p) for p in item.parameters())
        elif isinstance(item, Tensor):
            params[id(item)] = item
        else:
            raise TypeError(f"GateFreezer: expected nn.Module or Parameter, got {type(item).__name__}")
    return list(params.values())


class GateFreezer:
    """Stop updating gate parameters from step ``at_step`` on ("stop gate updates at some point").

    Call :meth:`step` once per training step (before ``optimizer.step()``). When ``step >= at_step``
    the parameters get ``requires_grad = False`` and their ``.grad`` is cleared, so optimizers skip
    them from that step on (including momentum / weight decay). Freezing is one-way.
    """

    def __init__(self, modules_or_params: nn.Module | nn.Parameter | Iterable, at_step: int) -> None:
        self.at_step = non_negative_int("at_step", at_step, unit="a training step", owner="GateFreezer")
        self.params = _collect_parameters(modules_or_params)
        if not self.params:
            raise ValueError("GateFreezer: no parameters found to freeze")
        self._frozen = False

    @property
    def frozen(self) -> bool:
        """True once the gate parameters have been frozen."""
        return self._frozen

    def step(self, step: int) -> bool:
        """Freeze the parameters if ``step >= at_step``; return :attr:`frozen`."""
        if not self._frozen and step >= self.at_step:
            for p in self.params:
                p.requires_grad_(False)
                p.grad = None
            self._frozen = True
        return self._frozen


class UncertaintyWeighting(nn.Module):
    """Learnable task weighting by homoscedastic uncertainty (Kendall, Gal & Cipolla, CVPR 2018).

    One learnable log-variance ``s_k`` per task (initialised to 0). The combined loss is exactly::

        L = sum_k exp(-s_k) * L_k + s_k

    (the common simplified form of ``L_k / (2 sigma_k^2) + log sigma_k`` with ``s_k = log sigma_k^2``,
    up to a factor 1/2). Add the module's parameters to the optimizer.
    """

    def __init__(self, tasks: list[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"UncertaintyWeighting: tasks must be non-empty and unique, got {tasks!r}")
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        """Combine per-task scalar losses (keys = the task names) into one scalar."""
        if set(losses) != set(self.tasks):
            raise KeyError(f"UncertaintyWeighting: expected losses for {self.tasks}, got {sorted(losses)}")
        stacked = torch.stack([losses[t] for t in self.tasks])
        return (torch.exp(-self.log_vars) * stacked + self.log_vars).sum()

    def weights(self) -> dict[str, float]:
        """Current weights ``exp(-s_k)`` per task."""
        values = torch.exp(-self.log_vars.detach()).tolist()
        return dict(zip(self.tasks, values, strict=True))
