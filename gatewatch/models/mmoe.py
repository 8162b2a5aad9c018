"""Reference MMoE (Ma et al., KDD 2018), OMoE (one shared gate) and shared-bottom models.

- ``MMoE``: ``y_k = h_k(sum_i g_{k,i}(x) f_i(x))`` with one softmax gate per task (``self.gates``, an
  ``nn.ModuleDict`` keyed by task), shared experts (``self.experts``) and towers (``self.towers``).
- ``OMoE``: the same with ONE gate ``self.gate`` shared by all tasks.
- ``SharedBottom``: ``y_k = h_k(f(x))``, no gates.

Experts are MLPs ending in a ReLU; towers end in a Linear to 1 output. ``forward`` returns one ``[N]``
tensor per task in task order (raw logits / values: no sigmoid). Gates are built by
:func:`gatewatch.remedies.make_gate` from the ``gate_*`` options (temperature, LayerNorm before the
softmax, GateDropout after it, small init std). Constructors take keyword arguments only, with JSON
values, kept in ``self.config`` so ``gatewatch.models.factory_ref`` / ``build`` can rebuild a model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from gatewatch.models.blocks import (
    MLP,
    SHARED,
    MultiTaskModel,
    arguments,
    check_sizes,
    gate_kwargs,
    gate_record,
    make_experts,
    make_towers,
    mix,
)
from gatewatch.remedies import make_gate

__all__ = ["MMoE", "OMoE", "SharedBottom"]


class _MixtureOfExperts(MultiTaskModel, ABC):
    """Shared experts + towers; subclasses decide how many gates there are."""

    def __init__(
        self,
        *,
        in_dim: int,
        tasks: Sequence[str],
        n_experts: int = 8,
        expert_hidden: Sequence[int] = (64,),
        expert_dim: int = 32,
        tower_hidden: Sequence[int] = (16,),
        gate_temperature: float = 1.0,
        gate_layernorm: bool = False,
        gate_dropout: float = 0.0,
        gate_init_std: float | None = None,
    ) -> None:
        super().__init__(arguments(locals()))
        check_sizes(in_dim=in_dim, n_experts=n_experts, expert_hidden=expert_hidden, expert_dim=expert_dim)
        check_sizes(tower_hidden=tower_hidden)
        self.experts = make_experts(n_experts, in_dim, expert_hidden, expert_dim)
        self._build_gates(lambda: make_gate(in_dim, n_experts, **gate_kwargs(self.config)))
        self.towers = make_towers(self.tasks, expert_dim, tower_hidden)

    @abstractmethod
    def _build_gates(self, new_gate: Callable[[], nn.Module]) -> None:
        """Create the gate module(s), calling ``new_gate()`` once per gate."""

    @abstractmethod
    def gate_probs(self, x: Tensor) -> list[Tensor]:
        """Gate probabilities ``[N, E]`` per task, in task order."""

    @abstractmethod
    def gatewatch_gates(self) -> dict[str, dict[str, Any]]:
        """Gate descriptions for gatewatch's auto-discovery."""

    def forward(self, x: Tensor) -> list[Tensor]:
        """One prediction ``[N]`` per task, in task order."""
        experts = [expert(x) for expert in self.experts]
        return self.tower_outputs([mix(p, experts) for p in self.gate_probs(x)])

    def expert_labels(self) -> list[str]:
        """Labels of the experts in gate-output order: ``"0" .. "E-1"``."""
        return [str(i) for i in range(len(self.experts))]


class MMoE(_MixtureOfExperts):
    """Multi-gate mixture-of-experts: one softmax gate per task over shared experts."""

    def _build_gates(self, new_gate: Callable[[], nn.Module]) -> None:
        self.gates = nn.ModuleDict({t: new_gate() for t in self.tasks})

    def gate_probs(self, x: Tensor) -> list[Tensor]:
        return [self.gates[t](x) for t in self.tasks]

    def gatewatch_gates(self) -> dict[str, dict[str, Any]]:
        """Gate descriptions keyed by task name (level 0, experts ``"0" .. "E-1"``)."""
        return {t: gate_record(self.gates[t], t, 0, self.expert_labels()) for t in self.tasks}


class OMoE(_MixtureOfExperts):
    """One-gate mixture-of-experts: a single softmax gate shared by all tasks."""

    def _build_gates(self, new_gate: Callable[[], nn.Module]) -> None:
        self.gate = new_gate()

    def gate_probs(self, x: Tensor) -> list[Tensor]:
        probs = self.gate(x)
        return [probs] * len(self.tasks)

    def gatewatch_gates(self) -> dict[str, dict[str, Any]]:
        """One gate description keyed ``"shared"`` (task None, level 0)."""
        return {SHARED: gate_record(self.gate, None, 0, self.expert_labels())}


class SharedBottom(MultiTaskModel):
    """Shared-bottom baseline: one shared MLP (ReLU output) feeding a tower per task; no gates."""

    def __init__(
        self,
        *,
        in_dim: int,
        tasks: Sequence[str],
        bottom_hidden: Sequence[int] = (64,),
        bottom_dim: int = 32,
        tower_hidden: Sequence[int] = (16,),
    ) -> None:
        super().__init__(arguments(locals()))
        check_sizes(in_dim=in_dim, bottom_hidden=bottom_hidden, bottom_dim=bottom_dim)
        check_sizes(tower_hidden=tower_hidden)
        self.bottom = MLP(in_dim, [*bottom_hidden, bottom_dim], last_activation=True)
        self.towers = make_towers(self.tasks, bottom_dim, tower_hidden)

    def forward(self, x: Tensor) -> list[Tensor]:
        """One prediction ``[N]`` per task, in task order."""
        shared = self.bottom(x)
        return self.tower_outputs([shared] * len(self.tasks))
