"""What a ``DeviceMesh``'s named dimensions mean to gatewatch: which ranks hold different tokens, which the same.

``GateWatch(..., mesh=mesh)`` reads the names of ``mesh.mesh_dim_names``:

* ``dp``, ``dp_replicate``, ``dp_shard``, ``cp`` (and ``ep``, carved out of the data-parallel ranks): the ranks
  along them hold different tokens, so token statistics add up over them; the ranks along ``ep`` also hold
  different experts (:func:`expert_shard`);
* ``tp``: the ranks along it see the same tokens, so a token is counted once (only the ranks at ``tp`` index 0
  contribute to the statistics of tokens);
* ``pp``: the ranks along it hold different layers (pipeline stages): each stage measures the gates it holds, and
  every rank knows every stage's gates (:mod:`gatewatch.capture.pipeline`);
* any other name is refused with the list of the names gatewatch knows.
"""

from __future__ import annotations

from typing import Any

TOKEN_DIMS = ("dp", "dp_replicate", "dp_shard", "cp", "ep")  # ranks along these hold different tokens
REPLICA_DIMS = ("tp",)  # ranks along these hold the same tokens
STAGE_DIM = "pp"  # ranks along it hold different layers
EXPERT_DIM = "ep"  # ranks along it hold different tokens and different experts
TENSOR_DIM = "tp"  # ranks along it hold the same tokens and different slices of the tensor-parallel parameters
KNOWN_DIMS = (*TOKEN_DIMS, *REPLICA_DIMS, STAGE_DIM)


def check_mesh(mesh: Any) -> None:
    """Refuse a mesh gatewatch cannot read, naming the fix."""
    names = getattr(mesh, "mesh_dim_names", None)
    if names is None:
        raise TypeError("mesh= takes a torch.distributed.device_mesh.DeviceMesh with named dimensions, e.g. "
                        "init_device_mesh('cpu', (2, 2), mesh_dim_names=('dp', 'tp')); got "
                        f"{type(mesh).__name__}{' without mesh_dim_names' if hasattr(mesh, 'ndim') else ''}.")
    unknown = [n for n in names if n not in KNOWN_DIMS]
    if unknown:
        raise ValueError(f"mesh= has dimensions {unknown} that gatewatch cannot place; it knows {list(KNOWN_DIMS)} "
                         "(rename the dimensions, or pass the sub-mesh of the known ones).")


def token_dims(mesh: Any) -> list[str]:
    """The dimensions of ``mesh`` whose ranks hold different tokens."""
    return [n for n in mesh.mesh_dim_names if n in TOKEN_DIMS]


def counts_tokens(mesh: Any) -> bool:
    """True on the ranks whose token statistics count: index 0 along every dimension that sees the same tokens."""
    names = list(mesh.mesh_dim_names)
    return all(mesh.get_local_rank(names.index(n)) == 0 for n in names if n in REPLICA_DIMS)


def pipeline_stage(mesh: Any) -> int | None:
    """This rank's pipeline stage (its index along ``pp``), or None when ``mesh`` has no ``pp`` dimension."""
    names = list(getattr(mesh, "mesh_dim_names", None) or ())
    return int(mesh.get_local_rank(names.index(STAGE_DIM))) if STAGE_DIM in names else None


def expert_shard(mesh: Any) -> tuple[int, int] | None:
    """``(this rank's index along 'ep', the size of 'ep')``, or None when ``mesh`` has no ``ep`` dimension."""
    return place_along(mesh, EXPERT_DIM)


def tensor_shard(mesh: Any) -> tuple[int, int] | None:
    """``(this rank's index along 'tp', the size of 'tp')``, or None when ``mesh`` has no ``tp`` dimension."""
    return place_along(mesh, TENSOR_DIM)


def place_along(mesh: Any, dim: str) -> tuple[int, int] | None:
    """``(this rank's index along dim, its size)``, or None when ``mesh`` has no such dimension."""
    names = list(getattr(mesh, "mesh_dim_names", None) or ())
    if dim not in names:
        return None
    return int(mesh.get_local_rank(names.index(dim))), int(mesh.size(names.index(dim)))
