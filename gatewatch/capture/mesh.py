"""What a ``DeviceMesh``'s named dimensions mean to gatewatch: which ranks hold different tokens, which the same.

``GateWatch(..., mesh=mesh)`` reads the names of ``mesh.mesh_dim_names``:

* ``dp``, ``dp_replicate``, ``dp_shard``, ``cp`` (and ``ep``, carved out of the data-parallel ranks): the ranks
  along them hold different tokens, so token statistics add up over them;
* ``tp``: the ranks along it see the same tokens, so a token is counted once (only the ranks at ``tp`` index 0
  contribute to the statistics of tokens);
* any other name is refused with the list of the names gatewatch knows.
"""

from __future__ import annotations

from typing import Any

TOKEN_DIMS = ("dp", "dp_replicate", "dp_shard", "cp", "ep")  # ranks along these hold different tokens
REPLICA_DIMS = ("tp",)  # ranks along these hold the same tokens
KNOWN_DIMS = TOKEN_DIMS + REPLICA_DIMS


def check_mesh(mesh: Any) -> None:
    """Refuse a mesh gatewatch cannot read, naming the fix."""
    names = getattr(mesh, "mesh_dim_names", None)
    if names is None:
        raise TypeError("mesh= takes a torch.distributed.device_mesh.DeviceMesh with named dimensions, e.g. "
                        "init_device_mesh('cpu', (2, 2), mesh_dim_names=('dp', 'tp')); got "
                        f"{type(mesh).__name__}{' without mesh_dim_names' if hasattr(mesh, 'ndim') else ''}.")
    unknown = [n for n in names if n not in KNOWN_DIMS]
    if "pp" in unknown:
        raise ValueError("mesh= has a 'pp' dimension: pipeline stages are not measured by gatewatch yet. Pass the "
                         "mesh without 'pp' (mesh['dp', 'tp'], say) to the watch of each stage that holds gates; its "
                         "figures then cover that stage's layers only (docs/distributed.md).")
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
