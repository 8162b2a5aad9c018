"""GateWatch(mesh=...): which named dimensions it reads, and the layouts it refuses by name (no process group
needed: a stand-in mesh with the two methods gatewatch calls)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _grouped_experts import GroupedMoE
from torch import nn

import gatewatch as gw
from gatewatch.capture.mesh import check_mesh, counts_tokens, expert_shard, pipeline_stage, tensor_shard, token_dims
from gatewatch.gating.expert_map import map_experts
from gatewatch.gating.specs import ResolvedGate
from gatewatch.models import MMoE
from gatewatch.quantities.conflict.layout import ConflictError
from gatewatch.quantities.conflict.shards import LOCAL_SCOPE
from gatewatch.skipped import EXPERT_PARALLEL_FIX, map_fix


class StandInMesh:
    """The named dimensions and this rank's index along each, as a DeviceMesh reports them."""

    def __init__(self, names: tuple[str, ...], local: tuple[int, ...], sizes: tuple[int, ...] | None = None) -> None:
        self.mesh_dim_names, self.local, self.sizes = names, local, sizes or (2,) * len(names)

    def get_local_rank(self, dim: int) -> int:
        return self.local[dim]

    def size(self, dim: int) -> int:
        return self.sizes[dim]


def test_token_dimensions_add_up_and_tensor_parallel_counts_once() -> None:
    mesh = StandInMesh(("dp_replicate", "dp_shard", "cp", "tp"), (1, 0, 1, 0))
    assert token_dims(mesh) == ["dp_replicate", "dp_shard", "cp"]
    assert counts_tokens(mesh)
    assert not counts_tokens(StandInMesh(("dp", "tp"), (0, 1)))  # a second tp rank sees the same tokens


def test_pipeline_stages_are_read_from_pp() -> None:
    check_mesh(StandInMesh(("dp", "pp"), (1, 2)))
    assert pipeline_stage(StandInMesh(("dp", "pp"), (1, 2))) == 2
    assert pipeline_stage(StandInMesh(("dp", "tp"), (1, 0))) is None
    assert token_dims(StandInMesh(("dp", "pp"), (0, 0))) == ["dp"]


def test_conflict_across_pipeline_stages_is_refused_with_the_reason(tmp_path: Path) -> None:
    model = MMoE(in_dim=4, tasks=["a", "b"], n_experts=2, expert_hidden=(), expert_dim=3)
    with pytest.raises(ConflictError, match=r"across pipeline stages.*autograd\.grad cannot cross.*conflict_every=0"):
        gw.GateWatch(model, tasks=["a", "b"], log_dir=tmp_path, conflict_every=1, mesh=StandInMesh(("pp",), (0,)))


def test_meshes_gatewatch_cannot_place_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"dimensions \['sp'\]"):
        check_mesh(StandInMesh(("dp", "sp"), (0, 0)))
    with pytest.raises(TypeError, match="mesh_dim_names"):
        check_mesh(object())


def test_conflict_on_a_tensor_parallel_mesh_is_measured(tmp_path: Path) -> None:
    assert tensor_shard(StandInMesh(("dp", "tp"), (0, 1))) == (1, 2)
    assert tensor_shard(StandInMesh(("dp", "ep"), (0, 1))) is None
    model = MMoE(in_dim=4, tasks=["a", "b"], n_experts=2, expert_hidden=(), expert_dim=3)
    watch = gw.GateWatch(model, tasks=["a", "b"], log_dir=tmp_path, conflict_every=1,
                         mesh=StandInMesh(("dp", "tp"), (0, 0)))  # not refused: tests/test_tensor_parallel.py
    watch.close()


def test_local_conflict_scope_under_expert_parallelism_is_refused(tmp_path: Path) -> None:
    model = MMoE(in_dim=4, tasks=["a", "b"], n_experts=2, expert_hidden=(), expert_dim=3)
    with pytest.raises(ConflictError, match="conflict_scope='local' is not measured on a mesh with 'ep'") as err:
        gw.GateWatch(model, tasks=["a", "b"], log_dir=tmp_path, conflict_every=1, conflict_scope="local",
                     mesh=StandInMesh(("dp", "ep"), (0, 1)))
    assert str(err.value) == LOCAL_SCOPE


def router_gate(model: nn.Module) -> ResolvedGate:
    return ResolvedGate("router", model.layers[0].router, "layers.0.router", top_k=2)


def test_fused_experts_under_ep_are_named_by_their_global_index() -> None:
    model = GroupedMoE(n_layers=1, n_experts=2)  # 'ep' rank 1 of 2: experts 2 and 3 of 4, as slices 0 and 1
    gate = router_gate(model)
    assert expert_shard(StandInMesh(("dp", "ep"), (0, 1))) == (1, 2)
    map_experts(model, gate, 4, ["a", "b"], shard=(1, 2))
    fused = gate.fused
    assert fused is not None and (fused.n_experts, fused.first, fused.ranks, fused.local) == (4, 2, 2, 2)
    assert fused.names() == [f"layers.0.experts[{i}]" for i in range(4)]
    assert fused.describe()["ep_ranks"] == 2 and "'ep' rank r holds experts 2*r to 2*r+1" in gate.expert_map
    map_experts(model, gate, 4, ["a", "b"], shard=(1, 2))  # a later call (the width seen on another rank) keeps it
    assert gate.fused == fused


def test_experts_under_ep_that_cannot_be_placed_say_why() -> None:
    model = GroupedMoE(n_layers=1, n_experts=2)
    uneven = router_gate(model)
    map_experts(model, uneven, 5, ["a", "b"], shard=(0, 2))
    assert uneven.fused is None and "its 5 experts do not split evenly over 2 ranks" in str(uneven.expert_map)
    model.layers[0].experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))  # separate modules, 2 of 4
    modules = router_gate(model)
    map_experts(model, modules, 4, ["a", "b"], shard=(0, 2))
    assert modules.fused is None and modules.expert_modules is None
    assert "each rank holds them as separate modules" in str(modules.expert_map)
    assert map_fix({"expert_map": modules.expert_map}) == EXPERT_PARALLEL_FIX


def test_conflict_scope_is_checked(tmp_path: Path) -> None:
    model = MMoE(in_dim=4, tasks=["a", "b"], n_experts=2, expert_hidden=(), expert_dim=3)
    with pytest.raises(ConflictError, match="conflict_scope must be one of"):
        gw.GateWatch(model, tasks=["a", "b"], log_dir=tmp_path, conflict_every=1, conflict_scope="global")
