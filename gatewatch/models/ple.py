"""Reference CGC and PLE models (Tang et al., RecSys 2020).

Each level has, per task, ``n_specific`` task-specific experts and ``n_shared`` shared experts.

- Task ``k``'s gate at a level mixes [task k's specific experts + the shared experts]; its input is
  task k's representation from the previous level (``x`` at level 0), as are its experts' inputs.
- At every level except the last, a shared gate mixes ALL experts of the level (every task's
  specific experts and the shared ones) into the input of the next level's shared experts and
  shared gate. The last level has no ``shared_gate`` attribute.
- ``expert_order`` fixes the order of the experts in the gates' inputs (and outputs):
  ``"specific_first"`` = [task experts..., shared...], ``"shared_first"`` = [shared..., task experts...].
  The shared gate follows the same rule, with the tasks' specific experts in task order.
- ``CGC`` is PLE with one level (``n_levels`` fixed to 1).

Structure: ``self.levels`` (``nn.ModuleList`` of :class:`PLELevel`, each with ``gates`` keyed by task,
``specific`` keyed by task, ``shared`` and, except on the last level, ``shared_gate``) and
``self.towers``. ``gatewatch_gates()`` names the gates ``"<task>.l<level>"`` and ``"shared.l<level>"``
and labels experts ``"<task>-<i>"`` / ``"shared-<i>"``. The task name ``"shared"`` is reserved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from gatewatch.models.blocks import (
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

__all__ = ["CGC", "EXPERT_ORDERS", "PLE", "PLELevel"]

EXPERT_ORDERS = ("specific_first", "shared_first")


class PLELevel(nn.Module):
    """One CGC level: per-task and shared experts, one gate per task, optionally a shared gate."""

    def __init__(
        self,
        *,
        in_dim: int,
        tasks: list[str],
        n_specific: int,
        n_shared: int,
        expert_hidden: Sequence[int],
        expert_dim: int,
        expert_order: str,
        with_shared_gate: bool,
        gate_options: dict[str, Any],
    ) -> None:
        super().__init__()
        self.tasks = tasks
        self.expert_order = expert_order
        self.specific = nn.ModuleDict(
            {t: make_experts(n_specific, in_dim, expert_hidden, expert_dim) for t in tasks}
        )
        self.shared = make_experts(n_shared, in_dim, expert_hidden, expert_dim)
        self.gates = nn.ModuleDict(
            {t: make_gate(in_dim, n_specific + n_shared, **gate_options) for t in tasks}
        )
        if with_shared_gate:
            self.shared_gate = make_gate(in_dim, len(tasks) * n_specific + n_shared, **gate_options)

    def _order(self, specific: list[Any], shared: list[Any]) -> list[Any]:
        """Concatenate specific and shared items in this level's expert order."""
        return specific + shared if self.expert_order == "specific_first" else shared + specific

    def _all_specific(self, per_task: dict[str, list[Any]]) -> list[Any]:
        return [item for t in self.tasks for item in per_task[t]]

    def _labels(self) -> tuple[dict[str, list[str]], list[str]]:
        specific = {t: [f"{t}-{i}" for i in range(len(self.specific[t]))] for t in self.tasks}
        return specific, [f"{SHARED}-{i}" for i in range(len(self.shared))]

    def task_expert_labels(self, task: str) -> list[str]:
        """Labels of the experts mixed by ``task``'s gate, in gate-output order."""
        specific, shared = self._labels()
        return self._order(specific[task], shared)

    def shared_expert_labels(self) -> list[str]:
        """Labels of the experts mixed by the shared gate, in gate-output order."""
        specific, shared = self._labels()
        return self._order(self._all_specific(specific), shared)

    def forward(
        self, task_inputs: Sequence[Tensor], shared_input: Tensor
    ) -> tuple[list[Tensor], Tensor | None]:
        """Per-task outputs (task order) and the shared output (None on a level without shared gate)."""
        shared = [expert(shared_input) for expert in self.shared]
        specific = {
            t: [expert(h) for expert in self.specific[t]]
            for t, h in zip(self.tasks, task_inputs, strict=True)
        }
        outputs = [
            mix(self.gates[t](h), self._order(specific[t], shared))
            for t, h in zip(self.tasks, task_inputs, strict=True)
        ]
        if not hasattr(self, "shared_gate"):
            return outputs, None
        return outputs, mix(self.shared_gate(shared_input), self._order(self._all_specific(specific), shared))


class PLE(MultiTaskModel):
    """Progressive Layered Extraction: ``n_levels`` stacked CGC levels, then one tower per task."""

    def __init__(
        self,
        *,
        in_dim: int,
        tasks: Sequence[str],
        n_levels: int = 2,
        n_specific: int = 1,
        n_shared: int = 1,
        expert_hidden: Sequence[int] = (64,),
        expert_dim: int = 32,
        tower_hidden: Sequence[int] = (16,),
        expert_order: str = "specific_first",
        gate_temperature: float = 1.0,
        gate_layernorm: bool = False,
        gate_dropout: float = 0.0,
        gate_init_std: float | None = None,
    ) -> None:
        super().__init__(arguments(locals()), reserved=(SHARED,))
        check_sizes(in_dim=in_dim, n_levels=n_levels, n_specific=n_specific, n_shared=n_shared)
        check_sizes(expert_hidden=expert_hidden, expert_dim=expert_dim, tower_hidden=tower_hidden)
        if expert_order not in EXPERT_ORDERS:
            raise ValueError(f"expert_order must be one of {EXPERT_ORDERS}, got {expert_order!r}")
        self.levels = nn.ModuleList(
            PLELevel(
                in_dim=in_dim if level == 0 else expert_dim,
                tasks=self.tasks,
                n_specific=n_specific,
                n_shared=n_shared,
                expert_hidden=expert_hidden,
                expert_dim=expert_dim,
                expert_order=expert_order,
                with_shared_gate=level < n_levels - 1,
                gate_options=gate_kwargs(self.config),
            )
            for level in range(n_levels)
        )
        self.towers = make_towers(self.tasks, expert_dim, tower_hidden)

    def forward(self, x: Tensor) -> list[Tensor]:
        """One prediction ``[N]`` per task, in task order."""
        task_inputs: list[Tensor] = [x] * len(self.tasks)
        shared: Tensor | None = x
        for level in self.levels:
            task_inputs, shared = level(task_inputs, shared)
        return self.tower_outputs(task_inputs)

    def gatewatch_gates(self) -> dict[str, dict[str, Any]]:
        """Every gate keyed ``"<task>.l<level>"`` / ``"shared.l<level>"`` with its softmax and experts.

        Expert labels name the level when there are several (``l1.shared-0``): each level has its own experts.
        """
        gates: dict[str, dict[str, Any]] = {}
        for index, level in enumerate(self.levels):
            def labels(names: list[str], index: int = index) -> list[str]:
                return [f"l{index}.{n}" for n in names] if len(self.levels) > 1 else names

            for t in self.tasks:
                gates[f"{t}.l{index}"] = gate_record(level.gates[t], t, index, labels(level.task_expert_labels(t)))
            if hasattr(level, "shared_gate"):
                gates[f"{SHARED}.l{index}"] = gate_record(
                    level.shared_gate, None, index, labels(level.shared_expert_labels())
                )
        return gates


class CGC(PLE):
    """Customized Gate Control: a single PLE level (no shared gate)."""

    def __init__(
        self,
        *,
        in_dim: int,
        tasks: Sequence[str],
        n_specific: int = 1,
        n_shared: int = 1,
        expert_hidden: Sequence[int] = (64,),
        expert_dim: int = 32,
        tower_hidden: Sequence[int] = (16,),
        expert_order: str = "specific_first",
        gate_temperature: float = 1.0,
        gate_layernorm: bool = False,
        gate_dropout: float = 0.0,
        gate_init_std: float | None = None,
    ) -> None:
        super().__init__(n_levels=1, **arguments(locals()))
        del self.config["n_levels"]
