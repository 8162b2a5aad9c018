"""Which expert module each gate column weighs: the map from a gate's outputs to module paths.

* Explicit: ``gw.Gate(..., expert_modules=[paths or modules])``, one per gate column, in column order.
* Inferred (:func:`infer_expert_modules`), walking up from the gate's module to the model root and taking the
  first scope that answers:

  - **one container of experts** (MMoE, OMoE, a router's layer): a direct child of the scope that is an
    ``nn.ModuleList`` / ``nn.ModuleDict`` of E modules; column i is its i-th child (insertion order for a
    ``ModuleDict``). Containers named like gates, routers, towers or heads are never experts;
  - **CGC/PLE**: a container of shared experts (its name says ``shared``) plus task-specific experts, held
    as a ``ModuleDict`` keyed by task of containers, a ``ModuleList`` of containers in task order, or one flat
    container of T x n experts in task order (``experts_specific[t*n:(t+1)*n]``). A task's gate mixes its own
    experts and the shared ones; a gate with no task (PLE's shared gate) mixes every task's experts in task
    order and the shared ones. The order of the two blocks is taken from an attribute of the scope whose
    value says ``shared_first`` or ``specific_first`` (this project's ``expert_order``), else from the gate's
    expert labels (the first names ``shared``: shared first), else specific first (Tang et al.'s order).

  - **fused experts** (:mod:`.fused_experts`): one module holding every expert as a slice of ``[E, ...]``
    parameters (transformers 5, torchtitan, batched-einsum MMoEs); the gate keeps it as ``fused``, with
    ``expert_modules`` left None as there is no module per expert.

The map is stored in run.json per gate (``expert_modules``, ``fused_experts``, ``expert_map``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from ..skipped import EXPERT_PARALLEL
from ..wrappers import unwrap
from .fused_experts import NOT_EXPERTS, SHARED, FusedExpertsError, FusedSlices, fused_in_scope

if TYPE_CHECKING:
    from .specs import ResolvedGate

Containers = (nn.ModuleList, nn.ModuleDict)


class ExpertMapError(ValueError):
    """An explicit expert map that does not fit the gate or the model; the message says what to pass."""


def explicit_expert_modules(model: nn.Module, items: Sequence[str | nn.Module], gate: str) -> list[str]:
    """The module paths of ``expert_modules=`` (paths or modules of ``model``), checked to exist."""
    if isinstance(items, (str, nn.Module)) or not items:
        raise ExpertMapError(f"Gate {gate!r}: expert_modules= takes a non-empty list with one module path (or "
                             "module) per gate column, e.g. ['experts.0', 'experts.1'].")
    modules = dict(model.named_modules())
    paths = {id(m): p for p, m in modules.items()}
    out = []
    for item in items:
        if isinstance(item, nn.Module):
            if id(item) not in paths:
                raise ExpertMapError(f"Gate {gate!r}: expert module {type(item).__name__} is not part of the model.")
            out.append(paths[id(item)])
        elif item in modules and item:
            out.append(str(item))
        else:
            near = [p for p in modules if p and p.split(".")[-1] == str(item).split(".")[-1]][:6]
            raise ExpertMapError(f"Gate {gate!r}: no module at {item!r} for expert_modules=. Paths come from "
                                 f"model.named_modules(){f', e.g. {near}' if near else ''}.")
    return out


def check_width(paths: list[str], n_experts: int, gate: str) -> None:
    """Raise when an explicit map does not have one path per gate column."""
    if len(paths) != n_experts:
        raise ExpertMapError(f"Gate {gate!r} has {n_experts} outputs but expert_modules= lists {len(paths)} "
                             "modules: pass one module path per gate column, in column order.")


def infer_expert_modules(model: nn.Module, gate_path: str, n_experts: int, task: str | None = None,
                         tasks: Sequence[str] | None = None, labels: Sequence[str] | None = None
                         ) -> tuple[list[str] | None, str]:
    """``(paths, how)``: the expert module of each of the gate's ``n_experts`` columns and how it was found
    (see the module docstring), or ``(None, why not)`` (also when the experts found are fused)."""
    paths, _, how = find_experts(model, gate_path, n_experts, task, tasks, labels)
    return paths, how


def find_experts(model: nn.Module, gate_path: str, n_experts: int | None, task: str | None = None,
                 tasks: Sequence[str] | None = None, labels: Sequence[str] | None = None
                 ) -> tuple[list[str] | None, FusedSlices | None, str]:
    """``(paths, fused, how)``: the gate's experts, as one module per column or as fused experts, found at the
    nearest scope around the gate that holds either (see the module docstring), or ``(None, None, why not)``.
    ``n_experts=None`` (the gate's width not known yet) looks for fused experts of any count only."""
    modules = dict(model.named_modules())
    parts = gate_path.split(".") if gate_path else []
    for depth in range(len(parts) - 1, -1, -1):
        scope = ".".join(parts[:depth])
        paths, how = (None, "") if n_experts is None else _in_scope(
            modules[scope], scope, gate_path, n_experts, task, list(tasks or []), labels)
        if paths is not None or how:
            return paths, None, how
        fused, why = fused_in_scope(modules[scope], scope, gate_path, n_experts)
        if fused is not None:
            return None, fused, fused.how("inferred")
        if why:
            return None, None, why
    return None, None, (f"experts of {gate_path!r} not found (no ModuleList/ModuleDict of {n_experts or 'E'} "
                        "expert modules and no module of fused [E, ...] expert parameters around it): pass "
                        "gw.Gate(..., expert_modules=[...]) or gw.Gate(..., expert_modules=gw.FusedExperts(module, "
                        "dim=...))")


def _join(scope: str, name: str) -> str:
    return f"{scope}.{name}" if scope else name


def _children(container: nn.Module, path: str) -> list[str]:
    return [_join(path, name) for name, _ in container.named_children()]


def _in_scope(owner: nn.Module, scope: str, gate_path: str, n: int, task: str | None, tasks: list[str],
              labels: Sequence[str] | None) -> tuple[list[str] | None, str]:
    """The map found among the direct children of ``owner``; ``(None, "")`` when this scope has none."""
    candidates = [(_join(scope, name), child) for name, child in owner.named_children()
                  if isinstance(child, Containers) and not NOT_EXPERTS.search(name)
                  and not (gate_path + ".").startswith(_join(scope, name) + ".")]
    flat = [(p, c) for p, c in candidates if len(c) and not any(isinstance(m, Containers) for m in c.children())]
    single = [(p, c) for p, c in flat if len(c) == n and not SHARED.search(p.rsplit(".", 1)[-1])]
    if len(single) > 1:
        single = [(p, c) for p, c in single if "expert" in p.rsplit(".", 1)[-1].lower()] or single
    shared = [(p, c) for p, c in flat if SHARED.search(p.rsplit(".", 1)[-1])]
    if len(shared) == 1 and tasks:
        mapped = _cgc(candidates, shared[0], n, task, tasks, owner, labels)
        if mapped[0] is not None:
            return mapped
    if len(single) == 1:
        path, container = single[0]
        return _children(container, path), f"inferred: children of {path}"
    if len(single) > 1:
        return None, (f"several containers of {n} modules could be the experts of gate {gate_path!r}: "
                      f"{[p for p, _ in single]}; pass gw.Gate(..., expert_modules=[...])")
    return None, ""


def _cgc(candidates: list[tuple[str, nn.Module]], shared: tuple[str, nn.Module], n: int, task: str | None,
         tasks: list[str], owner: nn.Module, labels: Sequence[str] | None) -> tuple[list[str] | None, str]:
    """CGC/PLE: the task's (or, without task, every task's) specific experts and the shared ones, ordered."""
    shared_paths = _children(shared[1], shared[0])
    for path, container in candidates:
        if container is shared[1]:
            continue
        per_task = _per_task(path, container, tasks)
        if per_task is None:
            continue
        specific = per_task[task] if task is not None else [p for t in tasks for p in per_task[t]]
        if len(specific) + len(shared_paths) != n:
            continue
        first = _shared_first(owner, labels)
        order = "shared first" if first else "specific first"
        paths = shared_paths + specific if first else specific + shared_paths
        return paths, f"inferred (CGC/PLE, {order}{'' if first is not None else ', assumed'}): {path} + {shared[0]}"
    return None, ""


def _per_task(path: str, container: nn.Module, tasks: list[str]) -> dict[str, list[str]] | None:
    """Each task's specific expert paths in ``container``, or None when it does not hold them by task."""
    kids = list(container.named_children())
    if (isinstance(container, nn.ModuleDict) and set(tasks) <= set(container.keys())
            and all(isinstance(container[t], Containers) for t in tasks)):
        return {t: _children(container[t], _join(path, t)) for t in tasks}
    if len(kids) == len(tasks) and all(isinstance(m, Containers) for _, m in kids):
        return {t: _children(m, _join(path, name)) for t, (name, m) in zip(tasks, kids, strict=True)}
    if kids and len(kids) % len(tasks) == 0 and not any(isinstance(m, Containers) for _, m in kids):
        k = len(kids) // len(tasks)
        flat = _children(container, path)
        return {t: flat[i * k:(i + 1) * k] for i, t in enumerate(tasks)}
    return None


def _shared_first(owner: nn.Module, labels: Sequence[str] | None) -> bool | None:
    """True / False when the scope or the labels say the shared experts come first; None when nothing says."""
    for value in vars(owner).values():
        if isinstance(value, str):
            said = value.lower().replace("-", "_")
            if "shared_first" in said:
                return True
            if "specific_first" in said or "task_first" in said:
                return False
    if labels:
        if SHARED.search(str(labels[0])):
            return True
        if SHARED.search(str(labels[-1])):
            return False
    return None


def map_experts(model: nn.Module, gate: ResolvedGate, n_experts: int, tasks: Sequence[str] | None,
                shard: tuple[int, int] | None = None) -> None:
    """Check a gate's explicit map against its width, or infer one (sets ``expert_modules`` or ``fused``, and
    ``expert_map``). ``shard`` (``(rank, ranks)`` along a mesh's ``ep``): this rank holds E/ranks of the experts
    (:func:`map_expert_shard`)."""
    if shard is not None:
        map_expert_shard(model, gate, n_experts, tasks, *shard)
        return
    if gate.expert_map is not None and gate.expert_map.startswith("explicit"):
        if gate.expert_modules is not None:
            check_width(gate.expert_modules, n_experts, gate.name)
        if gate.fused is not None and gate.fused.n_experts != n_experts:
            raise FusedExpertsError(f"Gate {gate.name!r} has {n_experts} outputs but its FusedExperts "
                                    f"{gate.fused.path!r} holds {gate.fused.n_experts} experts along the dimension "
                                    "given: pass dim= with the dimension that indexes the experts.")
        return
    gate.expert_modules, gate.fused, gate.expert_map = find_experts(
        unwrap(model), gate.path, n_experts, gate.task, tasks, gate.experts)


def map_expert_shard(model: nn.Module, gate: ResolvedGate, n_experts: int, tasks: Sequence[str] | None, rank: int,
                     ranks: int) -> None:
    """The map of a gate whose ``n_experts`` experts are split over ``ranks`` 'ep' ranks: this rank (``rank``
    along ``ep``) holds experts ``rank*E/ranks`` to ``(rank+1)*E/ranks - 1`` as fused ``[E/ranks, ...]``
    parameters, declared or found around the gate. Experts held otherwise get no map, with the reason."""
    if gate.fused is not None and gate.fused.ranks > 1:
        return  # placed already
    explicit = gate.expert_map is not None and gate.expert_map.startswith("explicit")
    local, fused, why = n_experts // ranks, None, ""
    if n_experts % ranks:
        why = f"its {n_experts} experts do not split evenly over {ranks} ranks"
    elif explicit and gate.fused is not None:
        if gate.fused.n_experts != local:
            raise FusedExpertsError(f"Gate {gate.name!r} has {n_experts} outputs, {local} per 'ep' rank, but its "
                                    f"FusedExperts {gate.fused.path!r} holds {gate.fused.n_experts} experts along the "
                                    "dimension given: pass dim= with the dimension that indexes this rank's experts.")
        fused = gate.fused
    elif explicit:
        why = "each rank holds them as separate modules (expert_modules=[...])"
    else:
        paths, fused, how = find_experts(unwrap(model), gate.path, local, gate.task, tasks, gate.experts)
        why = "each rank holds them as separate modules" if paths is not None else how
    if fused is None:
        gate.expert_modules, gate.fused, gate.expert_map = None, None, EXPERT_PARALLEL.format(why=why)
        return
    gate.expert_modules, gate.fused = None, fused.spread(rank, ranks)
    gate.expert_map = gate.fused.how("explicit" if explicit else "inferred")


TOWERS = re.compile(r"tower|head", re.IGNORECASE)


def find_towers(model: nn.Module, tasks: Sequence[str], towers: dict[str, str] | None = None) -> dict[str, str]:
    """The module of each task whose input is the task's mixture of experts (its tower): ``towers=`` checked, or
    inferred from a ``ModuleDict`` keyed by task or a ``ModuleList`` with one module per task, named like
    towers or heads; otherwise an :class:`ExpertMapError` shows what to pass."""
    modules = dict(model.named_modules())
    if towers is not None:
        if not isinstance(towers, dict) or set(towers) != set(tasks):
            raise ExpertMapError(f"towers= maps every task to its tower module path: {{task: path}} for tasks "
                                 f"{list(tasks)}; got {towers!r}.")
        missing = {t: p for t, p in towers.items() if p not in modules or not p}
        if missing:
            raise ExpertMapError(f"towers= names no module of the model for {missing}; paths come from "
                                 "model.named_modules().")
        return dict(towers)
    for path, module in modules.items():
        if not path or not TOWERS.search(path.rsplit(".", 1)[-1]):
            continue
        if isinstance(module, nn.ModuleDict) and set(tasks) <= set(module.keys()):
            return {t: f"{path}.{t}" for t in tasks}
        if isinstance(module, nn.ModuleList) and len(module) == len(tasks):
            return {t: f"{path}.{i}" for i, t in enumerate(tasks)}
    named = [p for p, m in modules.items() if p and any(t in p.split(".") for t in tasks) and next(m.children(), None)]
    example = {t: next((p for p in named if t in p.split(".")), f"<path of {t}'s tower>") for t in tasks}
    raise ExpertMapError(f"conflict_proxy needs each task's tower (the module whose input is the task's mixture of "
                         f"experts) and found no ModuleDict/ModuleList of towers or heads in {type(model).__name__}. "
                         f"Pass towers={example!r}.")
