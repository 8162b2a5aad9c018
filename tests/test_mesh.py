"""GateWatch(mesh=...): which named dimensions it reads, and the layouts it refuses by name (no process group
needed: a stand-in mesh with the two methods gatewatch calls)."""

from __future__ import annotations

from pathlib import Path

import pytest

import gatewatch as gw
from gatewatch.capture.mesh import check_mesh, counts_tokens, pipeline_stage, token_dims
from gatewatch.models import MMoE
from gatewatch.quantities.conflict.layout import ConflictError


class StandInMesh:
    """The named dimensions and this rank's index along each, as a DeviceMesh reports them."""

    def __init__(self, names: tuple[str, ...], local: tuple[int, ...]) -> None:
        self.mesh_dim_names, self.local = names, local

    def get_local_rank(self, dim: int) -> int:
        return self.local[dim]


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


@pytest.mark.parametrize("dim", ["tp", "ep"])
def test_conflict_on_a_layout_it_cannot_measure_is_refused(tmp_path: Path, dim: str) -> None:
    model = MMoE(in_dim=4, tasks=["a", "b"], n_experts=2, expert_hidden=(), expert_dim=3)
    with pytest.raises(ConflictError, match=f"not measured on a mesh with '{dim}'.*conflict_every=0"):
        gw.GateWatch(model, tasks=["a", "b"], log_dir=tmp_path, conflict_every=1,
                     mesh=StandInMesh(("dp", dim), (0, 0)))


def test_conflict_scope_is_checked(tmp_path: Path) -> None:
    model = MMoE(in_dim=4, tasks=["a", "b"], n_experts=2, expert_hidden=(), expert_dim=3)
    with pytest.raises(ConflictError, match="conflict_scope must be one of"):
        gw.GateWatch(model, tasks=["a", "b"], log_dir=tmp_path, conflict_every=1, conflict_scope="global")
