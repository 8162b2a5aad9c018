"""Mask experts out of gates, through forward hooks on the gate modules; the model's code is never edited.

Gates are resolved exactly as :class:`~gatewatch.GateWatch` resolves them (:func:`gatewatch.gating.discovery.resolve`),
so dotted paths, ``output="logits"``, ``extract=`` and the model's own ``gatewatch_gates()`` all work.
A mask is a boolean ``keep`` tensor over the gate's experts; the hook replaces the gate's output:

* probabilities: ``p * keep / sum(p * keep)`` (renormalised over the kept experts);
* logits: ``logits.masked_fill(~keep, -inf)``; the softmax the model applies afterwards then equals the
  renormalised mixture above, exactly.

Edge cases, by design:

* a row whose every expert is masked keeps its original output (it cannot be renormalised);
  :func:`knock_out` refuses to mask every expert of a gate, and :func:`gate_dropout` never masks them all;
* a probability row whose kept experts all have weight exactly 0 (an underflowed softmax) becomes uniform
  over the kept experts, so a knocked-out expert is removed even then.

Router tuples: the tensor that ``extract`` picked is swapped for the masked one where it sits in the
tuple / list / dict; a gate whose output needs more (e.g. top-k weights recomputed from the masked
logits) passes ``gw.Gate(..., inject=fn)`` with ``fn(output, new_tensor) -> new_output``.

Hooks and a watch: forward hooks run in registration order, and each one sees the output as changed by
the hooks before it. A :class:`~gatewatch.GateWatch` created *before* the mask records the gate's own
(unmasked) distribution, like ``GateDropout`` placed after the softmax; one created while the mask is
active, or a mask applied with ``prepend=True``, records the masked distribution.

Every hook is removed when the ``with`` block ends (or on :meth:`GateMasks.remove`): the model is left
exactly as it was.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .gating.discovery import resolve
from .gating.specs import GateOutputError, ResolvedGate
from .validate import dropout_rate

KeepFn = Callable[[torch.Tensor], torch.Tensor]  # gate tensor [..., E] -> bool keep mask broadcastable to it
GateSpecs = Mapping[str, Any] | Sequence[Any] | None


def resolve_gates(model: nn.Module, tasks: Sequence[str] | None, gates: GateSpecs) -> list[ResolvedGate]:
    """``gates=`` as GateWatch takes it, or a list of already resolved gates (returned as is)."""
    if isinstance(gates, Sequence) and gates and all(isinstance(g, ResolvedGate) for g in gates):
        return list(gates)
    return resolve(model, tasks, gates)


def gates_by_name(gates: Sequence[ResolvedGate], wanted: Iterable[str]) -> dict[str, ResolvedGate]:
    """The gates keyed by name; raises KeyError naming the gates of the model if one in ``wanted`` is not there."""
    by_name = {g.name: g for g in gates}
    unknown = sorted(set(wanted) - set(by_name))
    if unknown:
        raise KeyError(f"No gate named {unknown}; the gates of this model are {sorted(by_name)}.")
    return by_name


def masked_probs(p: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Probabilities ``p [..., E]`` with the experts where ``keep`` is False removed and each row renormalised."""
    keep = keep.expand_as(p)
    none_kept = ~keep.any(-1, keepdim=True)
    kept = p * keep
    mass = kept.sum(-1, keepdim=True)
    uniform = keep.to(p.dtype) / keep.sum(-1, keepdim=True).clamp_min(1).to(p.dtype)
    empty = mass == 0  # NaN rows stay NaN
    out = torch.where(empty, uniform, kept / torch.where(empty, torch.ones_like(mass), mass))
    return torch.where(none_kept, p, out)


def masked_logits(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Logits ``[..., E]`` with the masked experts set to ``-inf`` (rows with nothing kept unchanged)."""
    keep = keep.expand_as(logits) | ~keep.expand_as(logits).any(-1, keepdim=True)
    return logits.masked_fill(~keep, -math.inf)


def put_back(gate: ResolvedGate, output: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    """The module output with ``old`` (what ``extract`` returned) replaced by ``new``."""
    if gate.inject is not None:
        return gate.inject(output, new)
    if gate.extract is None:
        return new
    if isinstance(output, (tuple, list)):
        hits = [i for i, v in enumerate(output) if v is old]
        if len(hits) == 1:
            items = [new if i == hits[0] else v for i, v in enumerate(output)]
            return type(output)._make(items) if hasattr(output, "_make") else type(output)(items)
    if isinstance(output, Mapping):
        keys = [k for k, v in output.items() if v is old]
        if len(keys) == 1:
            out = copy.copy(output)
            out[keys[0]] = new
            return out
    raise GateOutputError(
        f"Gate {gate.name!r} ({gate.path}): the tensor picked by extract= is not one element of the module's "
        f"{type(output).__name__} output, so the masked tensor cannot be put back. Pass "
        "gw.Gate(..., inject=lambda out, new: ...) returning the module output rebuilt around the new tensor."
    )


class GateMasks:
    """Forward hooks that replace gate outputs by masked ones (a context manager).

    ``masks`` maps a gate name to a :data:`KeepFn`. Gates not named are left alone. Use the
    ready-made :func:`knock_out` and :func:`gate_dropout` for the usual masks.
    """

    def __init__(
        self,
        model: nn.Module,
        masks: Mapping[str, KeepFn],
        *,
        gates: GateSpecs = None,
        tasks: Sequence[str] | None = None,
        prepend: bool = False,
        training_only: bool = False,
    ) -> None:
        self.gates = resolve_gates(model, tasks, gates)
        self.training_only = training_only  # leave outputs of gates in eval mode untouched
        self._by_name = gates_by_name(self.gates, masks)
        self.masks = dict(masks)
        self.prepend = prepend
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, gate: ResolvedGate, keep_fn: KeepFn) -> Callable[..., Any]:
        def hook(module: nn.Module, _inputs: Any, output: Any) -> Any:
            if self.training_only and not module.training:
                return None
            t = gate.extract(output) if gate.extract is not None else output
            if not isinstance(t, torch.Tensor) or t.dim() < 1:
                raise GateOutputError(
                    f"Gate {gate.name!r} ({gate.path}) returned {type(t).__name__}, not a tensor [..., E]; pass "
                    "gw.Gate(..., extract=lambda out: out[0]) to pick the probabilities or logits."
                )
            keep = keep_fn(t).to(device=t.device, dtype=torch.bool)
            new = masked_logits(t, keep) if gate.output == "logits" else masked_probs(t, keep)
            return put_back(gate, output, t, new)

        return hook

    def apply(self) -> GateMasks:
        """Register the hooks (idempotent)."""
        if not self._handles:
            self._handles = [
                self._by_name[name].module.register_forward_hook(self._hook(self._by_name[name], fn),
                                                                 prepend=self.prepend)
                for name, fn in self.masks.items()
            ]
        return self

    def remove(self) -> None:
        """Remove every hook this object registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> GateMasks:
        return self.apply()

    def __exit__(self, *_exc: Any) -> None:
        self.remove()


def _knock_out_fn(gate: ResolvedGate, experts: list[int]) -> KeepFn:
    def keep(t: torch.Tensor) -> torch.Tensor:
        e = t.shape[-1]
        bad = [i for i in experts if not -e <= i < e]
        if bad:
            raise IndexError(f"Gate {gate.name!r} has {e} experts (0..{e - 1}); cannot knock out expert(s) {bad}.")
        if len({i % e for i in experts}) >= e:
            raise ValueError(f"Knocking out every expert of gate {gate.name!r} leaves nothing to mix; keep one.")
        mask = torch.ones(e, dtype=torch.bool, device=t.device)
        mask[experts] = False
        return mask

    return keep


def _expert_indices(gate: ResolvedGate, experts: int | Iterable[int | str]) -> list[int]:
    """Expert indices from ints or expert names (``gate.experts`` labels)."""
    items = [experts] if isinstance(experts, (int, str)) else list(experts)
    if not items:
        raise ValueError(f"No expert given to knock out of gate {gate.name!r}.")
    out = []
    for item in items:
        if isinstance(item, str):
            names = gate.expert_names() or []
            if item not in names:
                raise KeyError(f"Gate {gate.name!r} has no expert named {item!r}; its experts are {names}.")
            out.append(names.index(item))
        elif isinstance(item, int) and not isinstance(item, bool):
            out.append(item)
        else:
            raise TypeError(f"Experts are given by index (int) or name (str); got {item!r}.")
    return out


def knock_out(
    model: nn.Module,
    experts: Mapping[str, int | Iterable[int | str]],
    *,
    gates: GateSpecs = None,
    tasks: Sequence[str] | None = None,
    prepend: bool = False,
) -> GateMasks:
    """Remove experts from gates: ``with knock_out(model, {"ctr": [2]}): ...`` (indices or expert names)."""
    resolved = resolve_gates(model, tasks, gates)
    by_name = gates_by_name(resolved, experts)
    masks = {name: _knock_out_fn(by_name[name], _expert_indices(by_name[name], idx)) for name, idx in experts.items()}
    return GateMasks(model, masks, gates=resolved, prepend=prepend)


def dropout_keep(t: torch.Tensor, rate: float, generator: torch.Generator | None, at_least: int = 1) -> torch.Tensor:
    """A random keep mask for ``t [..., E]``: each expert dropped with probability ``rate``.

    A row that would keep fewer than ``at_least`` experts (a router's top-k: 1 for a dense gate) also keeps its
    ``at_least`` top experts, as :class:`gatewatch.remedies.GateDropout` keeps the argmax of a row that lost every
    expert, so eval-time dropout matches the training remedy and a router still chooses k experts.
    """
    drop = torch.rand(t.shape, generator=generator, device=t.device) < rate
    keep = ~drop
    at_least = min(at_least, t.shape[-1])
    top = torch.zeros_like(keep).scatter_(-1, t.topk(at_least, dim=-1).indices, True)
    return torch.where(keep.sum(-1, keepdim=True) < at_least, keep | top, keep)


class _Generators:
    """One seeded generator per device (a CPU generator cannot draw CUDA tensors)."""

    def __init__(self, seed: int, generator: torch.Generator | None) -> None:
        self.seed = seed
        self.by_device: dict[str, torch.Generator] = {}
        if generator is not None:
            self.by_device[str(generator.device)] = generator

    def __call__(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self.by_device:
            self.by_device[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self.by_device[key]


def gate_dropout(
    model: nn.Module,
    rate: float,
    *,
    gates: GateSpecs = None,
    tasks: Sequence[str] | None = None,
    only: Iterable[str] | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    prepend: bool = False,
) -> GateMasks:
    """Per-sample random gate dropout at ``rate`` on every gate (or the gates named in ``only``).

    Works in eval and training mode. Masks are drawn from ``generator`` (or a generator seeded with
    ``seed``), so a sweep is reproducible. Never leaves a row fewer experts than the gate chooses (its top-k; see
    :func:`dropout_keep`). On a router the dropped experts' logits are -inf before its top-k: each token chooses
    among the experts kept, with the weights renormalised as the router normalises them.
    """
    rate = dropout_rate("rate", rate, owner="gate dropout")
    resolved = resolve_gates(model, tasks, gates)
    names = [g.name for g in resolved] if only is None else list(only)
    by_name = gates_by_name(resolved, names)
    generators = _Generators(seed, generator)
    masks = {name: (lambda t, k=by_name[name].top_k or 1: dropout_keep(t, float(rate), generators(t.device), k))
             for name in names}
    return GateMasks(model, masks, gates=resolved, prepend=prepend)


def count_experts(model: nn.Module, gates: list[ResolvedGate], run: Callable[[], Any]) -> dict[str, int]:
    """Experts of each gate, read from its output while ``run()`` runs the model once (also sets ``n_experts``)."""
    seen: dict[str, int] = {}

    def probe(gate: ResolvedGate) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            seen.setdefault(gate.name, int(gate.to_probs(output).shape[-1]))

        return hook

    handles = [g.module.register_forward_hook(probe(g)) for g in gates]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    silent = [g.name for g in gates if g.name not in seen]
    if silent:
        raise GateOutputError(
            f"Gates {silent} produced no output while the model ran: they are not used in forward(). Pass the "
            "modules that compute the gate weights (gates=...)."
        )
    for g in gates:
        g.n_experts = seen[g.name]
    return seen
