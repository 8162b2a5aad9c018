"""Gradient conflict under expert parallelism (a mesh with ``ep``): each 'ep' rank holds E/ep of the experts.

Every rank runs each task's ``autograd.grad`` at the same time, so the backward of the training's all-to-all
dispatch carries every 'ep' rank's tokens to the experts' owners. On 'ep' rank r of R (D ranks holding the same
experts, the data-parallel dimensions besides ``ep``; N = D * R ranks in all), task k's gradient then holds:

* on the replicated parameters: the gradient of this rank's own loss, as under DDP; the mean over the N ranks is
  the applied gradient (an ``all_reduce`` over every token rank, divided by N);
* on this rank's experts (fused ``[E/R, ...]`` slices): the gradient of the sum of the R losses of its 'ep' group;
  the applied gradient is their sum over the D replicas divided by N (an ``all_reduce`` over the replicas only).

The statistics (:func:`~.maths.task_statistics`: Gram matrices, opposite-sign counts, purity histograms) are sums
over elements, so each rank computes them on its own layout, where the replicated elements are zeroed on every
'ep' rank but the first (counted once) and its expert slices carry their global names (``w1[r*E/R + i]``); the
sampled sign counts are scaled to their elements there. One ``all_reduce`` over ``ep`` of these small vectors,
each placed at its units' and groups' places in the layout of one process holding all E experts
(:attr:`ExpertShards.whole`), gives that process's statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ...capture.sharding import group_size
from .layout import Fused, SharedLayout
from .maths import PURITY_BINS, task_pairs

LOCAL_SCOPE = ("conflict_scope='local' is not measured on a mesh with 'ep': the backward of the all-to-all brings "
               "every 'ep' rank's tokens to the experts' owners, so no rank holds its own batch's gradient on every "
               "expert. Use conflict_scope='applied' (the default).")


@dataclass
class ExpertShards:
    """This rank's place among the 'ep' ranks, gatewatch's groups for them, and the two layouts (see the module
    docstring). ``tokens``: every rank holding other tokens (the data-parallel group, ``ep`` included);
    ``replicas``: the ranks holding the same experts (None: ``ep`` is the only such dimension); ``experts``: the
    'ep' ranks of this rank's group."""

    rank: int
    ranks: int
    tokens: Any
    replicas: Any
    experts: Any
    whole: SharedLayout | None = None  # the layout of one process with all E experts: the rows are written in it
    local: SharedLayout | None = None
    _expert_columns: torch.Tensor | None = field(default=None, repr=False)  # [M] bool: this rank's expert slices
    _places: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def layouts(self, names: list[str], params: list[nn.Parameter], reach: list[list[bool]],
                grouper: Callable[[str], str], param_limit: int, fused: dict[str, tuple[int, str, int]],
                expert_groups: bool) -> SharedLayout:
        """Build this rank's layout and the whole one from the shared parameters and their fused slices
        (``name -> (dim, module, first global index)``); returns this rank's."""
        whole_fused: Fused = {n: (d, m) for n, (d, m, _) in fused.items()}
        shapes = [torch.empty([s * (self.ranks if n in fused and k == fused[n][0] else 1)
                               for k, s in enumerate(p.shape)], device="meta") for n, p in zip(names, params,
                                                                                                   strict=True)]
        self.whole = SharedLayout.build(names, shapes, reach, grouper, param_limit, whole_fused,  # type: ignore[arg-type]
                                        expert_groups)
        self.whole.signs_scaled = True  # the sign counts arrive scaled to their elements
        self.local = SharedLayout.build(names, params, reach, grouper, param_limit, whole_fused, expert_groups,
                                        first={n: f for n, (_, _, f) in fused.items()})
        self.local.per_param = self.whole.per_param
        mask = torch.zeros(self.local.size, dtype=torch.bool)
        for (_, e), (s, t) in zip(self.local.pieces, self.local.bounds, strict=True):
            if e is not None:
                mask[s:t] = True
        self._expert_columns = mask.to(params[0].device)
        self._places = None
        return self.local

    def average(self, rows: torch.Tensor) -> None:
        """Replace ``rows`` (this rank's ``[K, M]`` task gradients) by the applied ones, in place."""
        mask = self._expert_columns
        assert mask is not None
        host = rows if rows.device.type == "cpu" else rows.cpu()
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
        """Zero the replicated elements of ``rows`` on every 'ep' rank but the first, so the sums count them once."""
        if self.rank and self._expert_columns is not None:
            rows.masked_fill_(~self._expert_columns, 0)

    def gather(self, stats: torch.Tensor, k: int) -> torch.Tensor:
        """The statistics of one process holding all E experts from this rank's (``stats``, laid out by
        :func:`~.maths.task_statistics` over :attr:`local`'s units and groups), summed over the 'ep' ranks."""
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
        dist.all_reduce(host, group=self.experts)
        return host.to(stats.device)

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
            unit_scale = local.elements(local.units) / local.sampled(local.units)
            group_scale = local.elements(local.group_bounds) / local.sampled(local.group_bounds)
            self._places = (units, groups, torch.from_numpy(unit_scale).to(like),
                               torch.from_numpy(group_scale).to(like))
        return self._places
