"""Sharded training as the quantities see it: FSDP2's parameters in the autograd graph, and the data-parallel group.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a module's registered parameters are ``DTensor`` shards; its
forward runs on unsharded copies, all-gathered for it, and those copies are the leaves of the autograd graph
(FSDP2 reduce-scatters their gradients into the shards' ``.grad``). A per-task ``torch.autograd.grad`` must
therefore ask for the unsharded copies: :func:`graph_leaves` finds them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .mesh import EXPERT_DIM, token_dims


def is_sharded(param: torch.Tensor) -> bool:
    """True for a ``DTensor`` parameter (FSDP2, tensor parallel)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(param, DTensor)


def graph_leaves(model: nn.Module) -> dict[int, torch.Tensor]:
    """``id(registered parameter) -> the tensor the forward used`` for every FSDP2-sharded parameter of ``model``
    whose unsharded copy exists (after the first forward); empty for a model without FSDP2."""
    out: dict[int, torch.Tensor] = {}
    for module in model.modules():
        state_of = getattr(module, "_get_fsdp_state", None)
        if state_of is None:
            continue
        state = state_of()
        groups = getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)]
        for group in groups:
            for fsdp_param in getattr(group, "fsdp_params", None) or []:
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None:
                    out[id(fsdp_param.sharded_param)] = unsharded
    return out


def data_parallel_group(model: nn.Module, mesh: Any = None) -> Any:
    """The process group over which the optimizer's gradients are averaged: DDP's own group, the data-parallel
    dimensions of ``mesh`` (``dp``, ``dp_replicate``, ``dp_shard``, ``cp``) flattened, or every rank (None)."""
    if mesh is not None:
        dims = token_dims(mesh)
        return flat_group(mesh, dims) if dims else None
    group = getattr(model, "process_group", None)
    return group if type(model).__name__ == "DistributedDataParallel" else None


def expert_replica_group(mesh: Any) -> Any:
    """Under expert parallelism: the process group over the ranks that hold the same experts (the data-parallel
    dimensions of ``mesh`` besides ``ep``, flattened), or None when ``ep`` is the only one."""
    dims = [d for d in token_dims(mesh) if d != EXPERT_DIM]
    return flat_group(mesh, dims) if dims else None


def flat_group(mesh: Any, dims: list[str]) -> Any:
    """The process group of ``mesh``'s dimensions ``dims`` (one or more) taken together."""
    return mesh[dims[0]].get_group() if len(dims) == 1 else mesh[tuple(dims)]._flatten().get_group()


def group_size(group: Any) -> int:
    """The number of ranks in ``group`` (None: every rank)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
