"""Gate specs: what the user passes (:class:`Gate`), what a gate is once bound to a module of the model
(:class:`ResolvedGate`, which turns the module's output into probabilities), and the errors about gates.

A gate is any module whose output gives, per sample (or token), a distribution over E experts:

* ``output="probs"``: the module emits probabilities (an ``nn.Softmax``, or any module ending in one);
* ``output="logits"``: the module emits logits and the model applies softmax itself (functionally);
* ``extract=fn``: ``fn(module_output)`` picks the tensor out of a richer output (e.g. a router's tuple);
  it returns probabilities, or logits when ``output="logits"``.
* ``inject=fn``: ``fn(module_output, new_tensor) -> new_output``, the inverse of ``extract``, used only by
  :mod:`gatewatch.masking` to put a masked tensor back (e.g. recompute a router's top-k from masked
  logits). Without it, the tensor ``extract`` returned is replaced where it sits in a tuple/list/dict.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..validate import positive_int
from .fused_experts import FusedExperts, FusedSlices
from .router_table import Router, affinity

Output = Literal["probs", "logits"]


class GateDiscoveryError(ValueError):
    """Gates could not be found or matched to tasks; the message says what to pass instead."""


class GateOutputError(ValueError):
    """A gate produced something that is not a distribution over experts."""


class NonFiniteGateError(RuntimeError):
    """NaN/Inf reached a gate output or a task loss, and ``GateWatch(on_nonfinite="raise")`` asked to stop."""


@dataclass
class Gate:
    """How to read one gate. ``module`` is an ``nn.Module`` or its dotted path in the model."""

    module: nn.Module | str
    output: Output = "probs"
    extract: Callable[[Any], torch.Tensor] | None = None
    task: str | None = None
    level: int | None = None
    experts: Sequence[str] | None = None
    top_k: int | None = None
    inject: Callable[[Any, torch.Tensor], Any] | None = None
    router: Router | None = None  # a sparse router: its scoring, choice and dispatch (sets extract, top_k, inject)
    # the experts the gate's columns weigh (gatewatch.gating.expert_map): one module per column, or
    # gw.FusedExperts(module, dim=...) for experts held as slices of [E, ...] parameters
    expert_modules: Sequence[str | nn.Module] | FusedExperts | None = None

    def __post_init__(self) -> None:
        if self.output not in ("probs", "logits"):
            raise ValueError(f"Gate output must be 'probs' or 'logits', got {self.output!r}.")
        if isinstance(self.experts, (FusedExperts, nn.Module)):
            raise TypeError(f"Gate experts= takes the names of the gate's columns (a list of str), got "
                            f"{type(self.experts).__name__}. Pass the expert modules as expert_modules=[...], or "
                            "experts held as slices of [E, ...] parameters as "
                            "expert_modules=gw.FusedExperts(module, dim=0).")
        if self.top_k is not None:
            positive_int("top_k", self.top_k, owner="Gate")


@dataclass
class ResolvedGate:
    """A gate bound to a module of the model, with its final name, task and level."""

    name: str
    module: nn.Module
    path: str
    output: Output = "probs"
    extract: Callable[[Any], torch.Tensor] | None = None
    task: str | None = None
    level: int = 0
    experts: list[str] | None = None
    top_k: int | None = None
    inject: Callable[[Any, torch.Tensor], Any] | None = None
    expert_modules: list[str] | None = None  # module path per column: explicit, or inferred at the first output
    expert_map: str | None = None  # how expert_modules was found ("explicit", "inferred ...") or why not
    router: Router | None = None
    fused: FusedSlices | None = None  # fused experts: declared, or inferred at the first output
    stage: int | None = None  # the pipeline stage that holds it (a mesh with 'pp'); None: no pipeline
    n_experts: int | None = field(default=None, init=False)
    elsewhere: ClassVar[bool] = False  # True: another pipeline stage holds it (gatewatch.capture.pipeline)

    def describe(self) -> dict[str, Any]:
        """The JSON-safe description stored in ``run.json``."""
        return {
            "name": self.name, "task": self.task, "level": self.level, "path": self.path,
            "output": self.output, "experts": self.n_experts, "expert_names": self.expert_names(),
            "top_k": self.top_k, "module_class": type(self.module).__name__,
            "expert_modules": self.expert_modules, "expert_map": self.expert_map,
            "fused_experts": None if self.fused is None else self.fused.describe(),
            "scoring": None if self.router is None else self.router.scoring,
            **({} if self.stage is None else {"stage": self.stage}),
        }

    def expert_names(self) -> list[str] | None:
        if self.experts is not None:
            return list(self.experts)
        return None if self.n_experts is None else [str(i) for i in range(self.n_experts)]

    def to_probs(self, out: Any) -> torch.Tensor:
        """Module output -> probabilities ``[N, E]`` (leading dimensions flattened), float32 or wider."""
        t = self.extract(out) if self.extract is not None else out
        if not isinstance(t, torch.Tensor):
            raise GateOutputError(
                f"Gate {self.name!r} ({self.path}) returned {type(t).__name__}, not a tensor. "
                "Pass gw.Gate(..., extract=lambda out: out[0]) to pick the probabilities or logits."
            )
        if t.dim() < 2:
            raise GateOutputError(
                f"Gate {self.name!r} ({self.path}) output has shape {tuple(t.shape)}; expected [N, E] "
                "(samples x experts). Point gates= at the module producing the gate weights."
            )
        t = t.detach() if t.dim() == 2 else t.detach().reshape(-1, t.shape[-1])
        if t.dtype not in (torch.float32, torch.float64):
            t = t.float()
        if self.router is not None:
            return affinity(self.router, t)
        return torch.softmax(t, dim=-1) if self.output == "logits" else t
