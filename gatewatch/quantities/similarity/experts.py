"""The pools of experts whose similarity is measured: the expert modules of each gate's columns, from
:mod:`gatewatch.gating.expert_map` (explicit ``gw.Gate(..., expert_modules=...)``, or inferred at the gate's first
output), grouped so that gates mixing the same experts share one pool; or a gate's fused experts (one module
holding every expert as a slice of ``[E, ...]`` parameters), one pool per fused module."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...gating.fused_experts import FusedSlices
from ...gating.specs import ResolvedGate


@dataclass
class Pool:
    """The experts one or more gates mix: their modules (in gate-column order), labels and paths. For fused
    experts, ``modules`` holds the one fused module, ``paths`` the experts' names (``<module path>[i]``) and
    ``fused`` the slices."""

    name: str
    gates: list[str]
    labels: list[str]
    modules: list[nn.Module]
    paths: list[str]
    fused: FusedSlices | None = None

    @property
    def size(self) -> int:
        """The number of experts."""
        return len(self.labels)


def _labels(gate: ResolvedGate, count: int) -> list[str]:
    """The gate's expert names (a router's ``<gate>:i`` shortened to ``i``), else the column indices."""
    names = gate.expert_names()
    if names is None or len(names) != count:
        return [str(i) for i in range(count)]
    return [n.removeprefix(f"{gate.name}:") for n in names]


def expert_pools(model: nn.Module, gates: list[ResolvedGate]) -> list[Pool]:
    """One :class:`Pool` per distinct set of two or more mapped experts among ``gates``.

    A pool drawn from one container of experts is named by its path (``"experts"``), fused experts by their
    module's path, else a pool is named by its first gate.
    """
    pools: dict[tuple[str, ...], Pool] = {}
    for gate in gates:
        fused = gate.fused
        paths = fused.names() if fused is not None else gate.expert_modules
        if not paths or len(paths) < 2:
            continue
        key = tuple(paths)
        if key in pools:
            pools[key].gates.append(gate.name)
            continue
        if fused is not None:
            pools[key] = Pool(fused.path, [gate.name], _labels(gate, len(paths)), [model.get_submodule(fused.path)],
                              list(paths), fused)
            continue
        parents = {p.rsplit(".", 1)[0] if "." in p else "" for p in paths}
        name = parents.pop() if len(parents) == 1 else ""
        pools[key] = Pool(name or gate.name, [gate.name], _labels(gate, len(paths)),
                          [model.get_submodule(p) for p in paths], list(paths))
    taken: set[str] = set()
    for pool in pools.values():
        if pool.name in taken:
            pool.name = pool.gates[0]
        taken.add(pool.name)
    return list(pools.values())
