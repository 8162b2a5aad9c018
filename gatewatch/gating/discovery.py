"""Gate discovery: which modules of a model are gates, and the :class:`ResolvedGate` of each.

Discovery (``gates=None``) uses, in this order:

1. the model's own ``gatewatch_gates()`` method, when it has one;
2. every module whose class is a known sparse router (transformers' Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3,
   GLM-4-MoE, GPT-OSS, Switch: :data:`gatewatch.gating.router_table.KNOWN`), one shared gate per layer
   named by its path, read as its :class:`~gatewatch.gating.router_table.Router` says;
3. when no module is of a known router class: every module named like a router or gate that returns
   ``(logits [T, E], weights [T, k], indices [T, k])`` when a copy of it is probed once with random tokens
   (:mod:`gatewatch.gating.router_probe`: its scoring is inferred from the weights, its dispatch read
   from its own indices), one shared gate per layer as in 2, provided the model has no other gate-like module
   (an ``nn.Softmax`` or a Linear named like a gate outside those routers); a guessed part raises a warning
   with the ``gw.Gate(path, router=gw.Router(...))`` to pass;
4. every ``nn.Softmax`` module in ``named_modules()`` order, matched to ``tasks``:

   * by name: a candidate whose dotted path contains a task name as a component
     (``gates.ctr``, ``gate_ctr.1``) belongs to that task, and candidates naming no task are shared
     gates (no task); each task needs at least one gate;
   * otherwise, when there are as many candidates as tasks, by position: the i-th softmax belongs
     to the i-th task.

   A task's gates get levels 0, 1, ... in module order, and so do the shared gates.

Anything else raises :class:`GateDiscoveryError` listing the candidates and the ``gates=`` to pass.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from ..wrappers import unwrap
from .expert_map import explicit_expert_modules
from .fused_experts import FusedExperts, declared
from .router_probe import Probed, named_like_router, router_hint, structural_routers
from .router_table import find_routers
from .specs import Gate, GateDiscoveryError, ResolvedGate


def _path_of(model: nn.Module, module: nn.Module) -> str:
    for path, m in model.named_modules():
        if m is module:
            return path
    raise GateDiscoveryError(
        f"The gate module {type(module).__name__} is not part of the model. Pass a module of this model, "
        "or its dotted path (see model.named_modules())."
    )


def _module_at(model: nn.Module, path: str) -> nn.Module:
    modules = dict(model.named_modules())
    if path in modules:
        return modules[path]
    similar = difflib.get_close_matches(path, [p for p in modules if p], n=8, cutoff=0.6)
    related = [p for p in modules if p and (path.split(".")[-1] in p.split(".") or p in path)]
    near = list(dict.fromkeys(similar + related))[:8]
    hint = f" Paths that look close: {near}." if near else " See model.named_modules() for the paths."
    raise GateDiscoveryError(f"No module at path {path!r} in {type(model).__name__}.{hint}")


def _output_size(model: nn.Module, path: str) -> int | None:
    """Best guess of a candidate's number of experts: the last Linear before it in its Sequential."""
    modules = dict(model.named_modules())
    module = modules[path]
    if isinstance(module, nn.Linear):
        return module.out_features
    parent_path, _, _ = path.rpartition(".")
    parent = modules.get(parent_path)
    if isinstance(parent, nn.Sequential):
        size = None
        for child in parent:
            if child is module:
                return size
            if isinstance(child, nn.Linear):
                size = child.out_features
    return None


def expected_width(model: nn.Module, gate: ResolvedGate) -> int | None:
    """The number of experts a gate's module suggests before its first output: a router's first weight matrix's
    rows, or the Linear feeding a softmax gate (None when neither tells)."""
    if gate.router is not None:
        weight = next((p for p in gate.module.parameters() if p.dim() == 2), None)
        return None if weight is None else int(weight.shape[0])
    return _output_size(model, gate.path)


def candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``nn.Softmax`` modules of the model, in module order."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Softmax)]


def _near_misses(model: nn.Module) -> list[str]:
    """Linear layers whose name suggests a gate or router (for functional-softmax models); never an MLP's
    ``gate_proj`` or a Qwen2-MoE ``shared_expert_gate``."""
    return [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and named_like_router(p)
            and m.out_features > 1]


def _outside(model: nn.Module, probed: list[Probed]) -> list[str]:
    """Softmax modules and gate-like Linear layers of ``model`` that are not inside a probed router."""
    def inside(path: str) -> bool:
        return any(path == r.path or path.startswith(r.path + ".") for r in probed)
    return [p for p in [*(p for p, _ in candidates(model)), *_near_misses(model)] if not inside(p)]


def _discovery_error(model: nn.Module, tasks: Sequence[str] | None, why: str,
                     probed: Sequence[Probed] = ()) -> GateDiscoveryError:
    cands = [p for p, _ in candidates(model)]
    lines = [f"gatewatch could not decide which modules are the gates of {type(model).__name__}: {why}"]
    if probed:
        lines.append("Modules that return (logits, weights, indices) like a sparse router, left out because the model "
                     "has other gate-like modules; to watch them, pass:")
        lines += [f"  {router_hint(p.path, p.router)}" for p in probed]
    if cands:
        lines.append("Softmax modules found (path, experts):")
        lines += [f"  {p!r}  E={_output_size(model, p) or '?'}" for p in cands]
    misses = _near_misses(model)
    if misses:
        lines.append("Linear layers that look like gate logits (softmax applied functionally?):")
        lines += [f"  {p!r}  E={_output_size(model, p)}" for p in misses]
    example_paths = cands or misses
    names = list(tasks) if tasks else [f"gate{i}" for i in range(len(example_paths))]
    if example_paths:
        output = "" if cands else ', output="logits"'
        pairs = [
            f'"{name}": gw.Gate("{path}"{output}, task="{name}")' if tasks else f'"{name}": "{path}"'
            for name, path in zip(names, example_paths, strict=False)
        ]
        lines.append("Pass the gates explicitly, e.g.:")
        lines.append("  gw.GateWatch(model, tasks=..., gates={" + ", ".join(pairs) + "}, log_dir=...)")
    else:
        lines.append(
            "No nn.Softmax module and no Linear named like a gate. If the gate is a router returning a "
            'tuple, pass gates={"router": gw.Gate("path.to.router", output="logits", '
            "extract=lambda out: out[0])}."
        )
    return GateDiscoveryError("\n".join(lines))


def _match_by_name(paths: list[str], tasks: Sequence[str]) -> list[str | None] | None:
    """Task of each path by name component, or None when a task gets no gate or a path names two."""
    owners: list[str | None] = []
    for path in paths:
        parts = set(re.split(r"[._]", path))
        hits = [t for t in tasks if t in parts]
        if len(hits) > 1:
            return None
        owners.append(hits[0] if hits else None)
    if any(t not in owners for t in tasks):
        return None
    return owners


def _with_levels(gates: list[ResolvedGate]) -> list[ResolvedGate]:
    """Number each task's gates (and the shared gates) 0, 1, ... and name them."""
    counts: dict[str | None, int] = {}
    for gate in gates:
        counts[gate.task] = counts.get(gate.task, 0) + 1
    seen: dict[str | None, int] = {}
    for gate in gates:
        level = seen.get(gate.task, 0)
        seen[gate.task] = level + 1
        gate.level = level
        if gate.task is None:
            gate.name = "shared" if counts[None] == 1 else f"shared.l{level}"
        else:
            gate.name = gate.task if counts[gate.task] == 1 else f"{gate.task}.l{level}"
    return gates


def discover(model: nn.Module, tasks: Sequence[str] | None) -> list[ResolvedGate]:
    """Find the gates of ``model`` (see the module docstring for the rules)."""
    own = getattr(model, "gatewatch_gates", None)
    if callable(own):
        return resolve(model, tasks, own())
    routers = find_routers(model)
    probed = [] if routers else structural_routers(model)
    if probed and not _outside(model, probed):  # routers recognised by their output, and nothing else gate-like
        for p in probed:
            if p.doubt is not None:
                warnings.warn(p.doubt, stacklevel=4)
        routers = [(p.path, p.module, p.router) for p in probed]
    if routers:  # sparse routers, one per MoE layer: shared gates named by their path
        return resolve(model, None, {path: Gate(module, router=router, level=level)
                                     for level, (path, module, router) in enumerate(routers)})
    found = candidates(model)
    if not found:
        raise _discovery_error(model, tasks, "it has no nn.Softmax module.", probed)
    paths = [p for p, _ in found]
    if not tasks:
        gates = [ResolvedGate(name=p, module=m, path=p) for p, m in found]
        return _with_levels(gates)
    owners = _match_by_name(paths, tasks)
    if owners is None and len(found) == len(tasks):
        owners = list(tasks)
    if owners is None:
        raise _discovery_error(
            model, tasks, f"{len(found)} softmax modules for {len(tasks)} tasks {list(tasks)}, and their "
            "names do not say which task each belongs to.", probed
        )
    gates = [ResolvedGate(name="", module=m, path=p, task=t) for (p, m), t in zip(found, owners, strict=True)]
    return _with_levels(gates)


def router_spec(spec: Gate, module: nn.Module) -> Gate:
    """``spec`` reading the router ``module`` as ``spec.router`` describes it: its logits, top k and inject."""
    router = spec.router
    assert router is not None
    return replace(spec, output="logits", extract=router.logits, top_k=router.top_k,
                   inject=spec.inject or (lambda out, new: router.inject(module, out, new)))


def _as_gate(spec: Any) -> Gate:
    if isinstance(spec, Gate):
        return spec
    if isinstance(spec, (str, nn.Module)):
        return Gate(spec)
    if isinstance(spec, Mapping) and "module" in spec:
        return Gate(**spec)
    raise TypeError(
        f"A gate spec must be a dotted module path, an nn.Module, a gw.Gate or a dict with 'module'; got "
        f"{type(spec).__name__}."
    )


def resolve(
    model: nn.Module, tasks: Sequence[str] | None, gates: Mapping[str, Any] | Sequence[Any] | None
) -> list[ResolvedGate]:
    """Turn the ``gates=`` argument of :class:`~gatewatch.GateWatch` into resolved gates."""
    model = unwrap(model)
    if gates is None:
        return discover(model, tasks)
    items: list[tuple[str | None, Any]]
    if isinstance(gates, Mapping):
        items = list(gates.items())
    elif isinstance(gates, Sequence) and not isinstance(gates, str):
        items = [(None, g) for g in gates]
    else:
        raise TypeError("gates= must be None, a dict {name: spec} or a list of specs.")
    if not items:
        raise GateDiscoveryError("gates= is empty: pass at least one gate, or None to discover them.")
    resolved: list[ResolvedGate] = []
    for name, raw in items:
        spec = _as_gate(raw)
        if isinstance(spec.module, str):
            module, path = _module_at(model, spec.module), spec.module
        else:
            module, path = spec.module, _path_of(model, spec.module)
        task = spec.task
        if task is None and tasks and name in tasks:
            task = name
        if task is not None and tasks and task not in tasks:
            raise GateDiscoveryError(f"Gate {name or path!r} names task {task!r}, which is not in tasks={tasks}.")
        if spec.router is not None:
            spec = router_spec(spec, module)
        resolved.append(ResolvedGate(
            name=name or "", module=module, path=path, output=spec.output, extract=spec.extract, task=task,
            level=spec.level if spec.level is not None else 0,
            experts=list(spec.experts) if spec.experts is not None else None, top_k=spec.top_k,
            inject=spec.inject, router=spec.router, **_explicit_map(model, spec, name or path),
        ))
    _name_unnamed(resolved, explicit_levels=[_as_gate(g).level is not None for _, g in items])
    names = [g.name for g in resolved]
    if len(set(names)) != len(names):
        raise GateDiscoveryError(f"Gate names must be unique; got {names}.")
    return resolved


def _explicit_map(model: nn.Module, spec: Gate, gate: str) -> dict[str, Any]:
    """The ``expert_modules`` / ``fused`` / ``expert_map`` of a gate spec that gives its experts (else empty)."""
    if spec.expert_modules is None:
        return {}
    if isinstance(spec.expert_modules, FusedExperts):
        fused = declared(model, spec.expert_modules, gate)
        return {"fused": fused, "expert_map": fused.how("explicit")}
    return {"expert_modules": explicit_expert_modules(model, spec.expert_modules, gate), "expert_map": "explicit"}


def _name_unnamed(gates: list[ResolvedGate], explicit_levels: list[bool]) -> None:
    """Number a task's gates 0, 1, ... in order (unless levels were given) and name unnamed gates.

    An unnamed gate is called after its task (``ctr``, or ``ctr.l1`` when the task has several gates);
    an unnamed gate with no task keeps its module path as its name.
    """
    seen: dict[str | None, int] = {}
    for gate, explicit in zip(gates, explicit_levels, strict=True):
        if not explicit:
            gate.level = seen.get(gate.task, 0)
            seen[gate.task] = gate.level + 1
    for gate in gates:
        if gate.name:
            continue
        several = sum(g.task == gate.task for g in gates) > 1
        if gate.task is None:
            gate.name = gate.path
        else:
            gate.name = f"{gate.task}.l{gate.level}" if several else gate.task
