"""Pipeline stages (a mesh's ``pp`` dimension): every stage's gates, known on every rank.

Each stage resolves the gates of the layers it holds. When the watch is built, every rank sends the description of
its gates to the others (one object all-gather in gatewatch's own group) and takes the union, stage by stage: its
own gates as they are, and each gate of another stage as a :class:`StageGate`, whose module is a stand-in that never
runs (its hooks never fire, so this rank fills none of that gate's states). Every rank then declares the same states
in the same order, gate i meaning the same gate everywhere, so that the reducer adds each stage's states into one
set of collectives (a rank holding no gate takes part with the reductions' identities) and the writer, rank 0,
turns every stage's gates into rows.

Levels count through the stages: a stage's gates of one task come after the earlier stages' gates of that task.
Gate names must differ between stages (keep the full model's module paths in each stage, as torchtitan does).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch.distributed as dist
from torch import nn

from ..gating.router_table import Router
from ..gating.specs import GateDiscoveryError, ResolvedGate
from ..skipped import PIPELINE


class HeldByStage(nn.Module):
    """The stand-in module of a gate that another pipeline stage holds: it never runs."""


@dataclass
class StageGate(ResolvedGate):
    """A gate another pipeline stage holds, described by that stage (``owner``: its run.json description)."""

    owner: dict[str, Any] = field(default_factory=dict)
    elsewhere: ClassVar[bool] = True

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "module_class": self.owner.get("module_class")}


def stage_gates(local: list[ResolvedGate], stage: int, group: object, *, none_found: Exception | None = None,
                failed: Exception | None = None) -> list[ResolvedGate]:
    """Every stage's gates in stage order, ``local`` (this rank's, at ``stage``) among them. ``none_found``: why
    discovery found no gate on this stage (raised only when no stage holds one); ``failed``: this rank's error in
    resolving ``gates=`` (raised on every rank, so that none waits for it). Every rank of ``group`` must call it
    (``group`` None: one process)."""
    for gate in local:
        gate.stage = stage
    mine = (stage, [(gate.describe(), _portable(gate.router)) for gate in local], failed and str(failed))
    every: list[Any] = [mine]
    if group is not None:
        every = [None] * dist.get_world_size(group)  # type: ignore[arg-type]
        dist.all_gather_object(every, mine, group=group)  # type: ignore[arg-type]
    if failed is not None:
        raise failed
    if bad := next((f"pipeline stage {s}: {why}" for s, _, why in every if why), None):
        raise GateDiscoveryError(bad)
    by_stage: dict[int, list[tuple[dict[str, Any], Router | None]]] = {}
    for s, described, _ in every:
        by_stage.setdefault(s, described)
    if not any(by_stage.values()):
        raise none_found or GateDiscoveryError("No pipeline stage holds a gate: pass gates= to the stages that "
                                               "hold them.")
    gates: list[ResolvedGate] = []
    for s in sorted(by_stage):
        gates += local if s == stage else [_stand_in(d, router, s) for d, router in by_stage[s]]
    _check_names(gates)
    _number_levels(gates)
    return gates


def _portable(router: Router | None) -> Router | None:
    """``router`` without its functions (they may be lambdas, which do not pickle): what another stage reads of it."""
    if router is None:
        return None
    first = Router.__dataclass_fields__["logits"].default
    return replace(router, logits=first, weights=first, indices=None if router.indices is None else first,
                   mask=None if router.mask is None else first)


def _stand_in(described: dict[str, Any], router: Router | None, stage: int) -> StageGate:
    gate = StageGate(name=described["name"], module=HeldByStage(), path=described["path"], output=described["output"],
                     task=described["task"], level=described["level"], experts=described["expert_names"],
                     top_k=described["top_k"], router=router, expert_map=PIPELINE.format(stage=stage), stage=stage,
                     owner=described)
    gate.n_experts = described["experts"]
    return gate


def _check_names(gates: list[ResolvedGate]) -> None:
    seen: dict[str, int | None] = {}
    for gate in gates:
        if gate.name in seen:
            raise GateDiscoveryError(f"Pipeline stages {seen[gate.name]} and {gate.stage} both hold a gate named "
                                     f"{gate.name!r}: keep the full model's module paths in each stage (as torchtitan "
                                     "does), or name the gates with gates={name: spec} on each stage.")
        seen[gate.name] = gate.stage


def _number_levels(gates: list[ResolvedGate]) -> None:
    """Shift each stage's levels past the earlier stages' levels of the same task."""
    offset: dict[str | None, int] = {}
    for stage in dict.fromkeys(g.stage for g in gates):
        mine = [g for g in gates if g.stage == stage]
        for gate in mine:
            gate.level += offset.get(gate.task, 0)
        for gate in mine:
            offset[gate.task] = max(offset.get(gate.task, 0), gate.level + 1)
