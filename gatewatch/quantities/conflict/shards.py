"""Gradient conflict when ranks hold parts of the shared parameters: expert parallelism (a mesh with ``ep``: each
'ep' rank holds E/ep of the experts) and tensor parallelism (a mesh with ``tp``: each 'tp' rank holds a slice of
every tensor-parallel parameter).

Every rank runs each task's ``autograd.grad`` at the same time, so the backward of the training's collectives (the
all-to-all dispatch, tensor parallelism's all-reduces) runs in them. Task k's gradient then holds, on this rank:

* under 'ep' (rank r of R; D ranks holding the same experts, the data-parallel dimensions besides ``ep``;
  N = D * R ranks holding other tokens): on the parameters every 'ep' rank holds, the gradient of this rank's own
  loss, as under DDP; the mean over the N ranks is the applied gradient (an ``all_reduce`` over every token rank,
  divided by N); on this rank's experts (fused ``[E/R, ...]`` slices), the gradient of the sum of the R losses of
  its 'ep' group; the applied gradient is their sum over the D replicas divided by N (an ``all_reduce`` over the
  replicas only);
* under 'tp': this rank's part of each parameter's gradient for its data-parallel group's batch (the 'tp' ranks see
  the same tokens): its shard for a DTensor parameter placed ``Shard`` along ``tp``, the whole gradient for a
  ``Replicate`` one or a plain tensor (a ``Partial`` gradient is first reduced over ``tp``, :func:`local_parts`);
  the applied gradient is the mean over the data-parallel ranks, which exclude ``tp`` (no 'tp' rank counts as
  further data).

The statistics (:func:`~.maths.task_statistics`: Gram matrices, opposite-sign counts, purity histograms) are sums
over elements, so each rank computes them on its own layout (:attr:`RankShards.local`), where the elements that
other 'ep' or 'tp' ranks hold as well are zeroed on every rank but the first along that dimension (counted once),
expert slices carry their global names (``w1[r*E/R + i]``) and a 'tp' shard counts towards its parameter's unit and
group; the sampled sign counts are scaled to their elements there. One ``all_reduce`` over ``ep`` and ``tp`` of these
small vectors, each placed at its units' and groups' places in the layout of one process holding every parameter
whole (:attr:`RankShards.whole`), gives that process's statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ...capture.mesh import TENSOR_DIM
from ...capture.sharding import group_size, is_sharded
from .layout import ConflictError, Fused, SharedLayout
from .maths import PURITY_BINS, task_pairs

LOCAL_SCOPE = ("conflict_scope='local' is not measured on a mesh with 'ep': the backward of the all-to-all brings "
               "every 'ep' rank's tokens to the experts' owners, so no rank holds its own batch's gradient on every "
               "expert. Use conflict_scope='applied' (the default).")


def tensor_split(name: str, leaf: torch.Tensor, tp: bool) -> int | None:
    """The dimension along which the 'tp' ranks hold slices of parameter ``name`` (the tensor its forward used),
    or None when every rank holds it whole; ConflictError for a placement whose slices cannot be told apart
    (sharded along another mesh dimension, or along 'tp' on a mesh passed without it)."""
    if not is_sharded(leaf):
        return None
    mesh, split = leaf.device_mesh, None  # type: ignore[attr-defined]
    for dim, placement in zip(mesh.mesh_dim_names or [None] * mesh.ndim, leaf.placements, strict=True):  # type: ignore[attr-defined]
        if not placement.is_shard():
            continue
        if dim != TENSOR_DIM or not tp:
            where = f"the mesh dimension {dim!r}" if dim is not None else "an unnamed mesh dimension"
            fix = ("pass mesh= with its 'tp' dimension" if dim == TENSOR_DIM else
                   "name the tensor-parallel dimension 'tp' and pass that mesh as mesh=, or pass shared= without "
                   "this parameter")
            raise ConflictError(f"parameter {name!r} is a DTensor sharded along {where} ({placement}), and gatewatch "
                                f"can only add up the slices of a parameter sharded along 'tp' of the mesh passed "
                                f"as mesh=; {fix}")
        split = placement.dim % leaf.ndim  # type: ignore[attr-defined]
    return split


def local_parts(grads: Sequence[torch.Tensor | None], leaves: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Each gradient as this rank holds it: a DTensor gradient in its parameter's placements (a ``Partial`` one is
    reduced, in the training's group, which every rank of it calls here alike), then its local tensor."""
    out: list[torch.Tensor | None] = []
    for grad, leaf in zip(grads, leaves, strict=True):
        if grad is not None and is_sharded(grad):
            if not is_sharded(leaf):
                grad = grad.full_tensor()  # type: ignore[attr-defined]
            else:
                if tuple(grad.placements) != tuple(leaf.placements):  # type: ignore[attr-defined]
                    grad = grad.redistribute(leaf.device_mesh, leaf.placements)  # type: ignore[attr-defined]
                grad = grad.to_local()  # type: ignore[attr-defined]
        out.append(grad)
    return out


@dataclass
class RankShards:
    """This rank's place along ``ep`` and ``tp`` (``(index, size)``, None: no such dimension), gatewatch's groups,
    and the two layouts (see the module docstring). ``tokens``: every rank holding other tokens (the data-parallel
    group, ``ep`` included; None: no other rank does, so the gradients need no averaging); ``replicas``: the ranks
    holding the same experts (None: ``ep`` is the only such dimension); ``parts``: the ranks along ``ep`` and ``tp``
    of this rank's group, over which the statistics are summed."""

    ep: tuple[int, int] | None
    tp: tuple[int, int] | None
    tokens: Any
    replicas: Any
    parts: Any
    whole: SharedLayout | None = None  # the layout of one process holding every parameter whole: rows are written in it
    local: SharedLayout | None = None
    _expert_columns: torch.Tensor | None = field(default=None, repr=False)  # [M] bool: this rank's 'ep' experts
    _counted: torch.Tensor | None = field(default=None, repr=False)  # [M] bool: the elements this rank counts
    _places: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def layouts(self, names: list[str], params: list[nn.Parameter], leaves: list[torch.Tensor],
                reach: list[list[bool]], grouper: Callable[[str], str], param_limit: int,
                fused: dict[str, tuple[int, str, int]], expert_groups: bool) -> SharedLayout:
        """Build this rank's layout and the whole one from the shared parameters, the tensors their forward used
        (``leaves``) and their fused slices (``name -> (dim, module, first global index)``); returns this rank's.
        ConflictError for a placement :func:`tensor_split` cannot read."""
        whole_fused: Fused = {n: (d, m) for n, (d, m, _) in fused.items()}
        held, whole, first, splits = [], [], {}, {}
        for name, leaf in zip(names, leaves, strict=True):
            split = splits[name] = tensor_split(name, leaf, self.tp is not None)
            shape = list(leaf.shape)  # a DTensor's shape is the whole one
            held.append(list(leaf.to_local().shape if is_sharded(leaf) else shape))  # type: ignore[attr-defined]
            if name in fused:
                d, _, start = fused[name]
                if split == d and self.tp is not None:  # 'tp' slices along the experts: this rank's come from
                    per = -(-shape[d] // self.tp[1])  # torch.chunk's split
                    start += min(self.tp[0] * per, shape[d])
                first[name] = start
                if self.ep is not None:
                    shape[d] *= self.ep[1]
            whole.append(shape)
        self.whole = SharedLayout.build(names, params, reach, grouper, param_limit, whole_fused, expert_groups,
                                        shapes=whole)
        self.whole.signs_scaled = True  # the sign counts arrive scaled to their elements
        self.local = SharedLayout.build(names, params, reach, grouper, param_limit, whole_fused, expert_groups,
                                        first=first, shapes=held)
        self.local.per_param = self.whole.per_param
        experts = torch.zeros(self.local.size, dtype=torch.bool)
        sliced = torch.zeros(self.local.size, dtype=torch.bool)
        for (i, e), (s, t) in zip(self.local.pieces, self.local.bounds, strict=True):
            experts[s:t] = e is not None
            sliced[s:t] = splits[self.local.param_names[i]] is not None
        counted = torch.ones(self.local.size, dtype=torch.bool)
        if self.ep is not None and self.ep[0]:  # the parameters every 'ep' rank holds: counted on the first
            counted &= experts
        if self.tp is not None and self.tp[0]:  # the parameters every 'tp' rank holds whole: counted on the first
            counted &= sliced
        device = params[0].device
        self._expert_columns = experts.to(device) if self.ep is not None else None
        self._counted = None if bool(counted.all()) else counted.to(device)
        self._places = None
        return self.local

    def average(self, rows: torch.Tensor) -> None:
        """Replace ``rows`` (this rank's ``[K, M]`` task gradients) by the applied ones, in place."""
        if self.tokens is None:  # no other rank holds other tokens: this rank's gradients are the applied ones
            return
        host = rows if rows.device.type == "cpu" else rows.cpu()
        mask = self._expert_columns
        if mask is None:
            dist.all_reduce(host, group=self.tokens)
        else:
            cpu_mask = mask.cpu()
            shared, experts = host[:, ~cpu_mask], host[:, cpu_mask]
            dist.all_reduce(shared, group=self.tokens)
            if self.replicas is not None:
                dist.all_reduce(experts, group=self.replicas)
            host[:, ~cpu_mask], host[:, cpu_mask] = shared, experts
        host.div_(group_size(self.tokens))
        if host is not rows:
            rows.copy_(host)

    def count_once(self, rows: torch.Tensor) -> None:
        """Zero the elements of ``rows`` that a rank before this one along ``ep`` or ``tp`` counts as well."""
        if self._counted is not None:
            rows.masked_fill_(~self._counted, 0)

    def gather(self, stats: torch.Tensor, k: int) -> torch.Tensor:
        """The statistics of one process holding every parameter whole from this rank's (``stats``, laid out by
        :func:`~.maths.task_statistics` over :attr:`local`'s units and groups), summed over the 'ep' and 'tp'
        ranks."""
        assert self.whole is not None and self.local is not None
        units, groups, unit_scale, group_scale = self._placed(stats)
        pairs, bins = len(task_pairs(k)), PURITY_BINS + 1
        n_units, n_groups = len(self.local.units), len(self.local.groups)
        grams, disagree, counts = stats.split([n_units * k * k, n_units * pairs, n_groups * bins])
        size = [len(self.whole.units) * k * k, len(self.whole.units) * pairs, len(self.whole.groups) * bins]
        out = stats.new_zeros(sum(size))
        to_grams, to_disagree, to_counts = out.split(size)
        to_grams.view(-1, k * k).index_add_(0, units, grams.view(n_units, k * k))
        to_disagree.view(-1, pairs).index_add_(0, units, disagree.view(n_units, pairs) * unit_scale[:, None])
        to_counts.view(-1, bins).index_add_(0, groups, counts.view(n_groups, bins) * group_scale[:, None])
        host = out if out.device.type == "cpu" else out.cpu()
        dist.all_reduce(host, group=self.parts)
        return host.to(stats.device)

    def settings(self) -> dict[str, int]:
        """What run.json records about the ranks: ``ep_ranks`` and ``tp_ranks``, where the mesh has them."""
        return {f"{dim}_ranks": place[1] for dim, place in (("ep", self.ep), ("tp", self.tp)) if place is not None}

    def _placed(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where this rank's units and groups lie among the whole layout's, and the factors that scale their
        sampled sign counts to their elements."""
        if self._places is None:
            local, whole = self.local, self.whole
            assert local is not None and whole is not None
            at = {n: i for i, n in enumerate(whole.unit_names)}
            group_at = {g: i for i, g in enumerate(whole.groups)}
            units = torch.tensor([at[n] for n in local.unit_names], dtype=torch.int64, device=like.device)
            groups = torch.tensor([group_at[g] for g in local.groups], dtype=torch.int64, device=like.device)
            unit_scale = local.elements(local.units) / local.sampled(local.units).clip(min=1)
            group_scale = local.elements(local.group_bounds) / local.sampled(local.group_bounds).clip(min=1)
            self._places = (units, groups, torch.from_numpy(unit_scale).to(like),
                            torch.from_numpy(group_scale).to(like))
        return self._places
