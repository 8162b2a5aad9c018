"""Which parameters the tasks are compared on, and how they roll up into modules.

``shared=`` picks them (names, prefixes or modules), or they are discovered: every parameter that two or
more tasks' losses reach. :class:`SharedLayout` orders them so that each module group is one contiguous
range of the flat gradient buffer; fused experts' parameters are cut into one slice per expert.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import torch
from torch import nn

from .maths import sample_ranges

SharedSpec = str | nn.Module | Sequence[str | nn.Module] | None
GroupSpec = int | Callable[[str], str] | None


class ConflictError(ValueError):
    """Conflict settings that cannot work; the message says what to pass instead."""


def module_grouper(model: nn.Module, spec: GroupSpec = None) -> Callable[[str], str]:
    """The function parameter name -> module group.

    * ``None``: the module owning the parameter, where a module inside an ``nn.Sequential`` counts as part
      of it (an MLP expert is one group: ``experts.3``); a leaf layer (``Linear`` ...) inside a
      ``ModuleList`` / ``ModuleDict`` groups with its siblings under the child of the deepest such
      container (a router's expert ``layers.2.moe.experts.5``, a transformer layer ``layers.2``);
    * an int ``n``: the first ``n`` components of the owning module's path (``2``: ``levels.0``);
    * a callable ``name -> str``.
    """
    if callable(spec):
        return spec
    if spec is not None:
        if isinstance(spec, bool) or not isinstance(spec, int) or spec < 1:
            raise ConflictError(
                f"conflict_group must be None, a positive module-path depth or a callable name -> group; got {spec!r}."
            )
        depth = spec
        return lambda name: ".".join(name.split(".")[:-1][:depth]) or name
    modules = dict(model.named_modules())
    containers = {path for path, m in modules.items() if isinstance(m, (nn.ModuleList, nn.ModuleDict))}

    def group(name: str) -> str:
        parts = name.split(".")[:-1]
        while len(parts) > 1 and isinstance(modules.get(".".join(parts[:-1])), nn.Sequential):
            parts = parts[:-1]
        owner = modules.get(".".join(parts))
        if owner is not None and next(owner.children(), None) is None:
            for i in range(len(parts) - 1, 0, -1):
                if ".".join(parts[:i]) in containers:
                    return ".".join(parts[: i + 1])
        return ".".join(parts) or name

    return group


def select_shared(model: nn.Module, spec: SharedSpec) -> list[str] | None:
    """Names of the parameters picked by ``shared=`` (names, name prefixes or modules); None when not given."""
    if spec is None:
        return None
    items = [spec] if isinstance(spec, (str, nn.Module)) else list(spec)
    if not items:
        raise ConflictError("shared= is empty: pass parameter names, name prefixes or modules, or None to discover.")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    chosen: dict[str, None] = {}
    for item in items:
        if isinstance(item, nn.Module):
            ids = {id(p) for p in item.parameters()}
            hits = [n for n, p in params if id(p) in ids]
            what = f"module {type(item).__name__}"
        elif isinstance(item, str):
            hits = [n for n, _ in params if n == item or n.startswith(item + ".")]
            what = repr(item)
        else:
            raise ConflictError(f"shared= takes parameter names, prefixes or modules; got {type(item).__name__}.")
        if not hits:
            near = sorted({n.rsplit(".", 2)[0] for n, _ in params})[:12]
            raise ConflictError(
                f"shared={what} matches no trainable parameter of {type(model).__name__}. Pass names or prefixes "
                f"from model.named_parameters(), e.g. {near}, or modules of this model."
            )
        chosen.update(dict.fromkeys(hits))
    return list(chosen)


Fused = dict[str, tuple[int, str]]  # fused parameter name -> (expert dimension, name of the experts' module)


@dataclass
class SharedLayout:
    """The shared parameters, their pieces in group order in the flat buffer, and which task reaches which.

    A piece is a whole parameter, or for fused experts (``fused``) the slice of one expert along the
    parameter's expert dimension, named ``<parameter>[i]`` and grouped with the expert's other slices under
    ``<experts module>[i]`` (unless ``conflict_group`` says otherwise). Every group's pieces are contiguous, so a
    fused parameter lies in the buffer as E evenly spaced slices: :meth:`view` is a strided view of it, and
    the Gram matrices and sign counts of its slices are batched operations on views, with no copy.
    """

    names: list[str]  # piece names, in buffer order
    params: list[nn.Parameter]  # in the order of their first piece
    param_names: list[str]
    pieces: list[tuple[int, int | None]]  # (parameter index, expert index or None), in buffer order
    dims: list[int | None]  # each parameter's expert dimension (None: not fused)
    groups: list[str]
    group_of: list[int]  # group index of each piece
    reach: list[list[bool]]  # [task][parameter]: the task's loss reaches the parameter
    per_param: bool
    signs_scaled: bool = False  # the sign counts come scaled to their elements (gathered from 'ep' / 'tp' ranks)
    shapes: list[tuple[int, ...]] = field(default_factory=list)  # each parameter's gradient as laid out (default:
    # the parameter's shape; under 'tp' this rank's shard of it, see .shards)
    bounds: list[tuple[int, int]] = field(init=False)
    group_bounds: list[tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.shapes = [tuple(s) for s in self.shapes] or [tuple(p.shape) for p in self.params]
        start, self.bounds = 0, []
        for i, e in self.pieces:
            shape, d = self.shapes[i], self.dims[i]
            size = self.numel(i) if e is None else self.numel(i) // shape[d]  # type: ignore[index]
            self.bounds.append((start, start + size))
            start += size
        self.group_bounds = []
        for gi in range(len(self.groups)):
            members = [b for b, g in zip(self.bounds, self.group_of, strict=True) if g == gi]
            self.group_bounds.append((members[0][0], members[-1][1]))
        self._starts: list[list[int]] = [[] for _ in self.params]
        for (i, _), (s, _) in zip(self.pieces, self.bounds, strict=True):
            self._starts[i].append(s)

    @property
    def size(self) -> int:
        return self.bounds[-1][1] if self.bounds else 0

    @property
    def units(self) -> list[tuple[int, int]]:
        return self.bounds if self.per_param else self.group_bounds

    @property
    def unit_names(self) -> list[str]:
        return self.names if self.per_param else self.groups

    def numel(self, i: int) -> int:
        """How many elements of parameter ``i`` the buffer holds."""
        return int(np.prod(self.shapes[i], dtype=np.int64))

    @property
    def fused(self) -> bool:
        return any(d is not None for d in self.dims)

    def elements(self, bounds: Sequence[tuple[int, int]]) -> np.ndarray:
        return np.array([e - s for s, e in bounds], dtype=np.float64)

    def sampled(self, bounds: Sequence[tuple[int, int]]) -> np.ndarray:
        """How many elements of each range the sign statistics count (ranges tile units end to end)."""
        if self.signs_scaled:
            return self.elements(bounds)
        return np.array([e - s for s, e in sample_ranges(self.units, bounds)], dtype=np.float64)

    def views(self, row: torch.Tensor, i: int) -> list[tuple[torch.Tensor, int | None]]:
        """Where parameter ``i`` lies in the flat ``row`` (1-D, contiguous): ``(view, None)`` shaped like the
        parameter, or, for a fused parameter whose slices are not evenly spaced, ``(view, e)`` per expert e."""
        whole, d, starts = self.shapes[i], self.dims[i], self._starts[i]
        if d is None:
            return [(row[starts[0]:starts[0] + self.numel(i)].view(whole), None)]
        shape = [n for k, n in enumerate(whole) if k != d]
        inner = [int(np.prod(shape[k + 1:])) for k in range(len(shape))]
        if len(starts) > 1 and any(b - a != starts[1] - starts[0] for a, b in pairwise(starts)):
            return [(row.as_strided(shape, inner, row.storage_offset() + s), e) for e, s in enumerate(starts)]
        spacing = starts[1] - starts[0] if len(starts) > 1 else 0
        block = row.as_strided([len(starts), *shape], [spacing, *inner], row.storage_offset() + starts[0])
        return [(block.movedim(0, d), None)]

    @classmethod
    def build(cls, names: list[str], params: list[nn.Parameter], reach: list[list[bool]],
              grouper: Callable[[str], str], param_limit: int, fused: Fused | None = None,
              expert_groups: bool = True, first: dict[str, int] | None = None,
              shapes: Sequence[Sequence[int]] | None = None) -> SharedLayout:
        """Order the pieces so that every group's elements are contiguous (groups in first-seen order); a fused
        parameter (``fused``) is cut into its experts' slices, grouped by expert when ``expert_groups``, slice i
        named as expert ``first[name] + i`` (expert or tensor parallelism: this rank's slices of all experts).
        ``shapes``: the parameters' gradients as laid out, when not the parameters' own shapes."""
        fused, first = fused or {}, first or {}
        shapes = [tuple(s) for s in shapes] if shapes is not None else [tuple(p.shape) for p in params]
        pieces: list[tuple[int, int | None]] = []
        piece_names, labels = [], []
        for i, (name, shape) in enumerate(zip(names, shapes, strict=True)):
            if name not in fused:
                pieces.append((i, None))
                piece_names.append(name)
                labels.append(str(grouper(name)))
                continue
            d, module = fused[name]
            for e in range(shape[d]):
                pieces.append((i, e))
                index = first.get(name, 0) + e
                piece_names.append(f"{name}[{index}]")
                labels.append(f"{module}[{index}]" if expert_groups else str(grouper(f"{name}[{index}]")))
        groups = list(dict.fromkeys(labels))
        rank = {g: k for k, g in enumerate(groups)}
        order = sorted(range(len(pieces)), key=lambda k: rank[labels[k]])
        first = list(dict.fromkeys(pieces[k][0] for k in order))  # parameters in the order of their first piece
        position = {i: n for n, i in enumerate(first)}
        return cls(
            names=[piece_names[k] for k in order], params=[params[i] for i in first],
            param_names=[names[i] for i in first], pieces=[(position[pieces[k][0]], pieces[k][1]) for k in order],
            dims=[fused[names[i]][0] if names[i] in fused else None for i in first], groups=groups,
            group_of=[rank[labels[k]] for k in order], reach=[[r[i] for i in first] for r in reach],
            per_param=len(pieces) <= param_limit, shapes=[shapes[i] for i in first],
        )
