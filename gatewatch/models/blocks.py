"""Small building blocks shared by the reference models: MLPs, experts, towers, mixing, gate records.

The gate builder itself is :func:`gatewatch.remedies.make_gate` (one place for all gate options).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..validate import positive_int

#: Gate name reserved for shared gates (OMoE's single gate, PLE's per-level shared gates).
SHARED = "shared"


class MLP(nn.Sequential):
    """``Linear`` layers through ``sizes`` with ReLU between them, and after the last one if asked."""

    def __init__(self, in_dim: int, sizes: Sequence[int], *, last_activation: bool) -> None:
        dims = [in_dim, *sizes]
        layers: list[nn.Module] = []
        for i in range(len(sizes)):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if last_activation or i < len(sizes) - 1:
                layers.append(nn.ReLU())
        super().__init__(*layers)
        self.out_dim = dims[-1]


def make_experts(n: int, in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.ModuleList:
    """``n`` expert MLPs ``in_dim -> hidden... -> out_dim``, each ending in a ReLU."""
    return nn.ModuleList(MLP(in_dim, [*hidden, out_dim], last_activation=True) for _ in range(n))


def make_towers(tasks: Sequence[str], in_dim: int, hidden: Sequence[int]) -> nn.ModuleDict:
    """One tower per task ``in_dim -> hidden... -> 1`` (no final activation: raw logit / value)."""
    return nn.ModuleDict({t: MLP(in_dim, [*hidden, 1], last_activation=False) for t in tasks})


def mix(probs: Tensor, expert_outputs: Sequence[Tensor]) -> Tensor:
    """Mixture ``sum_i probs[:, i] * expert_outputs[i]``: ``[N, E]`` and E x ``[N, D]`` -> ``[N, D]``."""
    stacked = torch.stack(list(expert_outputs), dim=1)
    return torch.bmm(probs.unsqueeze(1), stacked).squeeze(1)


def softmax_of(gate: nn.Module) -> nn.Softmax:
    """The ``nn.Softmax`` module inside a gate (the gate itself if it is one)."""
    for module in gate.modules():
        if isinstance(module, nn.Softmax):
            return module
    raise ValueError(f"gate has no nn.Softmax module: {gate}")


def gate_record(gate: nn.Module, task: str | None, level: int, experts: Sequence[str]) -> dict[str, Any]:
    """One entry of ``gatewatch_gates()``: the gate's softmax module, its task, level, expert labels."""
    return {"module": softmax_of(gate), "task": task, "level": level, "experts": list(experts)}


def gate_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for :func:`gatewatch.remedies.make_gate` from a model config's ``gate_*`` entries."""
    return {
        "temperature": config["gate_temperature"],
        "layernorm": config["gate_layernorm"],
        "dropout": config["gate_dropout"],
        "init_std": config["gate_init_std"],
    }


def check_tasks(tasks: Sequence[str], reserved: Sequence[str] = ()) -> list[str]:
    """Validate task names (non-empty unique strings usable as module keys); return them as a list."""
    names = list(tasks) if not isinstance(tasks, str) else []
    if not names or len(set(names)) != len(names):
        raise ValueError(f"tasks must be a non-empty list of unique names, got {tasks!r}")
    for name in names:
        if not isinstance(name, str) or not name or "." in name or name in reserved:
            raise ValueError(
                f"invalid task name {name!r}: use a non-empty string without '.', not {reserved}"
            )
    return names


def check_sizes(**sizes: int | Sequence[int]) -> None:
    """Raise ValueError unless every named size (or every entry of a size list) is an int >= 1."""
    for name, value in sizes.items():
        if isinstance(value, Sequence) and not isinstance(value, str):
            for i, v in enumerate(value):
                positive_int(f"{name}[{i}]", v)
        else:
            positive_int(name, value)


def arguments(local_vars: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments from ``locals()`` taken first thing in ``__init__`` (drops self, dunders)."""
    return {k: v for k, v in local_vars.items() if k != "self" and not k.startswith("__")}


class MultiTaskModel(nn.Module):
    """Base of the reference models: keeps the constructor kwargs (``config``), tasks and towers.

    ``config`` holds only JSON values, so ``gatewatch.models.factory_ref`` can record how to
    rebuild the model.
    """

    towers: nn.ModuleDict

    def __init__(self, config: dict[str, Any], reserved: Sequence[str] = ()) -> None:
        super().__init__()
        self.tasks = check_tasks(config["tasks"], reserved)
        self.config = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in config.items()}

    def tower_outputs(self, hidden: Sequence[Tensor]) -> list[Tensor]:
        """Apply each task's tower to its representation; one ``[N]`` tensor per task, in task order."""
        return [self.towers[t](h).squeeze(-1) for t, h in zip(self.tasks, hidden, strict=True)]
