"""The pools of experts whose similarity is measured: the expert modules of each gate's columns, from
:mod:`gatewatch.gating.expert_map` (explicit ``gw.Gate(..., expert_modules=...)``, or inferred at the gate's first
output), grouped so that gates mixing the same experts share one pool."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...gating.specs import ResolvedGate


@dataclass
class Pool:
    """The experts one or more gates mix: their modules (in gate-column order), labels and paths."""

    name: str
    gates: list[str]
    labels: list[str]
    modules: list[nn.Module]
    paths: list[str]


def expert_pools(model: nn.Module, gates: list[ResolvedGate]) -> list[Pool]:
    """One :class:`Pool` per distinct set of two or more mapped experts among ``gates``.

    A pool drawn from one container of experts is named by its path (``"experts"``), else by its first gate.
    """
    pools: dict[tuple[str, ...], Pool] = {}
    for gate in gates:
        paths = gate.expert_modules
        if not paths or len(paths) < 2:
            continue
        key = tuple(paths)
        if key in pools:
            pools[key].gates.append(gate.name)
            continue
        parents = {p.rsplit(".", 1)[0] if "." in p else "" for p in paths}
        name = parents.pop() if len(parents) == 1 else ""
        names = gate.expert_names()
        labels = names if names is not None and len(names) == len(paths) else [str(i) for i in range(len(paths))]
        pools[key] = Pool(name or gate.name, [gate.name], labels, [model.get_submodule(p) for p in paths],
                          list(paths))
    taken: set[str] = set()
    for pool in pools.values():
        if pool.name in taken:
            pool.name = pool.gates[0]
        taken.add(pool.name)
    return list(pools.values())
