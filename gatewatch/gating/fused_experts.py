"""Fused experts: the experts of a layer held as slices of shared ``[E, ...]`` parameters, one module for all.

* Found with no configuration (:func:`fused_in_scope`, tried by :mod:`.expert_map` at each scope around a gate):
  a child module not named like a gate, router, tower, head or shared expert, with no parameters in its own
  children, whose parameters all have E rows along dimension 0 and one of them at least three dimensions.
  That covers transformers 5's ``*Experts`` modules (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``,
  the transposed ``[E, H, 2I]`` layouts and the ``*_bias [E, ...]`` of GPT-OSS), torchtitan's grouped
  experts (``w1``/``w2``/``w3`` ``[E, ...]``) and MMoEs that run their experts as one batched einsum over
  ``[E, D, H]`` weights.
* Declared: ``gw.Gate(..., expert_modules=gw.FusedExperts(module, dim=...))``, also for parameters whose expert
  dimension is not 0.

Expert i is ``param.select(dim, i)`` of each listed parameter and is named ``<module path>[i]``; the slice of
one parameter is named ``<parameter name>[i]``. Under expert parallelism (a mesh with ``ep``) each of the R ranks
holds E/R experts, 'ep' rank r experts ``r*E/R`` to ``(r+1)*E/R - 1`` as slices 0 to ``E/R - 1``
(:meth:`FusedSlices.spread`); the names are the global ones. run.json stores the map per gate under
``fused_experts`` (:meth:`FusedSlices.describe`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from torch import nn

NOT_EXPERTS = re.compile(r"gate|gating|router|routing|tower|head", re.IGNORECASE)
SHARED = re.compile(r"shared|common", re.IGNORECASE)


class FusedExpertsError(ValueError):
    """A fused-experts declaration that does not fit the model or the gate; the message says what to pass."""


@dataclass(frozen=True)
class FusedExperts:
    """Experts stored as slices of the parameters of one module (``gw.FusedExperts``).

    Args:
        module: the module holding every expert's weights (an ``nn.Module`` of the model or its dotted path).
        dim: the expert dimension of its parameters: one int for all of them, or ``{parameter name: dim}``
            (names relative to ``module``, e.g. ``{"w_in": 1, "w_out": 0}``), which also limits the experts to
            the parameters listed.

    Pass it as ``gw.Gate(..., expert_modules=gw.FusedExperts(module, dim=0))``: ``experts=`` keeps naming the
    gate's columns.
    """

    module: nn.Module | str
    dim: int | Mapping[str, int] = 0


@dataclass(frozen=True)
class FusedSlices:
    """Fused experts bound to the model: the module's path, each parameter's full name and expert dimension, the
    number of experts (all ranks' under expert parallelism) and, under expert parallelism, this rank's first
    expert and the number of 'ep' ranks they are split over."""

    path: str
    params: dict[str, int]
    n_experts: int
    first: int = 0  # the global index of slice 0 of this rank's parameters
    ranks: int = 1  # 'ep' ranks the experts are split over (1: this process holds them all)

    @property
    def local(self) -> int:
        """How many experts this rank's parameters hold."""
        return self.n_experts // self.ranks

    def spread(self, rank: int, ranks: int) -> FusedSlices:
        """These slices (this rank's) as 'ep' rank ``rank`` of ``ranks``' share of ``n_experts * ranks`` experts."""
        return replace(self, n_experts=self.n_experts * ranks, first=rank * self.n_experts, ranks=ranks)

    def names(self) -> list[str]:
        """The name of each expert (every rank's): ``<module path>[i]``."""
        return [f"{self.path}[{i}]" for i in range(self.n_experts)]

    def how(self, found: str) -> str:
        """The ``expert_map`` text of run.json: how the map was found and what expert i is made of."""
        parts = ", ".join(f"{name.rsplit('.', 1)[-1]}[i] (dim {d})" for name, d in self.params.items())
        split = "" if self.ranks == 1 else (f", split over {self.ranks} 'ep' ranks: 'ep' rank r holds experts "
                                            f"{self.local}*r to {self.local}*r+{self.local - 1} as its slices "
                                            f"0 to {self.local - 1}")
        return f"{found}: fused experts {self.path}, expert i = {parts}{split}"

    def describe(self) -> dict[str, object]:
        """run.json's ``fused_experts`` of a gate: expert i is slice i of each parameter along its dimension
        (under expert parallelism, ``ep_ranks``: slice i - r*E/R of 'ep' rank r's parameters)."""
        out: dict[str, object] = {"module": self.path, "params": dict(self.params), "experts": self.n_experts}
        return out if self.ranks == 1 else {**out, "ep_ranks": self.ranks}


def declared(model: nn.Module, spec: FusedExperts, gate: str) -> FusedSlices:
    """``spec`` checked against ``model``: the module exists, every listed parameter has the same expert count."""
    modules = dict(model.named_modules())
    if isinstance(spec.module, nn.Module):
        path = next((p for p, m in modules.items() if m is spec.module), None)
        if path is None:
            raise FusedExpertsError(f"Gate {gate!r}: FusedExperts module {type(spec.module).__name__} is not part "
                                    "of the model.")
    elif spec.module in modules and spec.module:
        path = spec.module
    else:
        raise FusedExpertsError(f"Gate {gate!r}: no module at {spec.module!r} for FusedExperts; paths come from "
                                "model.named_modules().")
    own = dict(modules[path].named_parameters())
    if isinstance(spec.dim, Mapping):
        unknown = sorted(set(spec.dim) - set(own))
        if unknown or not spec.dim:
            raise FusedExpertsError(f"Gate {gate!r}: FusedExperts(dim=...) names {unknown or 'no parameter'} of "
                                    f"{path!r}; its parameters are {sorted(own)}.")
        dims = dict(spec.dim)
    else:
        dims = dict.fromkeys(own, spec.dim)
    if not dims:
        raise FusedExpertsError(f"Gate {gate!r}: module {path!r} given as FusedExperts has no parameter.")
    params, sizes = {}, {}
    for name, d in dims.items():
        p = own[name]
        if isinstance(d, bool) or not isinstance(d, int) or not -p.dim() <= d < p.dim():
            raise FusedExpertsError(f"Gate {gate!r}: FusedExperts dim {d!r} does not fit {name} of shape "
                                    f"{tuple(p.shape)}; pass the dimension that indexes the experts.")
        d %= p.dim()
        params[f"{path}.{name}"], sizes[name] = d, p.shape[d]
    if len(set(sizes.values())) != 1:
        raise FusedExpertsError(f"Gate {gate!r}: the parameters of {path!r} have different expert counts along "
                                f"their expert dimension: {sizes}. Pass dim={{name: dim}} with the dimension of "
                                "each parameter that indexes the experts, listing only the experts' parameters.")
    return FusedSlices(path, params, next(iter(sizes.values())))


def _fused(module: nn.Module, n: int | None) -> bool:
    """Does ``module`` look like fused experts (``n`` of them, or any count when None)?"""
    own = list(module.named_parameters(recurse=False))
    if not own or any(True for child in module.children() for _ in child.parameters()):
        return False
    counts = {p.shape[0] if p.dim() >= 2 else -1 for _, p in own}
    return len(counts) == 1 and counts != {-1} and (n is None or counts == {n}) and any(p.dim() >= 3 for _, p in own)


def fused_in_scope(owner: nn.Module, scope: str, gate_path: str, n: int | None) -> tuple[FusedSlices | None, str]:
    """The fused experts among the direct children of ``owner`` (``n`` experts; any count when None), or
    ``(None, why not)`` (an empty reason when this scope holds none)."""
    found = []
    for name, child in owner.named_children():
        path = f"{scope}.{name}" if scope else name
        if NOT_EXPERTS.search(name) or SHARED.search(name) or (gate_path + ".").startswith(path + "."):
            continue
        if _fused(child, n):
            found.append((path, child))
    if len(found) > 1:
        found = [(p, c) for p, c in found if "expert" in p.rsplit(".", 1)[-1].lower()] or found
    if len(found) > 1:
        return None, (f"several modules could be the fused experts of gate {gate_path!r}: {[p for p, _ in found]}; "
                      "pass gw.Gate(..., expert_modules=gw.FusedExperts(module, dim=...))")
    if not found:
        return None, ""
    path, module = found[0]
    params = {f"{path}.{name}": 0 for name, _ in module.named_parameters(recurse=False)}
    size = next(iter(module.parameters())).shape[0]
    return FusedSlices(path, params, int(size)), ""
