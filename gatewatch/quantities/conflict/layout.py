"""Which parameters the tasks are compared on, and how they roll up into modules.

``shared=`` picks them (names, prefixes or modules), or they are discovered: every parameter that two or
more tasks' losses reach. :class:`SharedLayout` orders them so that each module group is one contiguous
range of the flat gradient buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
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


@dataclass
class SharedLayout:
    """The shared parameters in group order, their place in the flat buffer, and which task reaches which."""

    names: list[str]
    params: list[nn.Parameter]
    groups: list[str]
    group_of: list[int]  # group index of each parameter
    reach: list[list[bool]]  # [task][parameter]: the task's loss reaches the parameter
    per_param: bool
    bounds: list[tuple[int, int]] = field(init=False)
    group_bounds: list[tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        start, self.bounds = 0, []
        for p in self.params:
            self.bounds.append((start, start + p.numel()))
            start += p.numel()
        self.group_bounds = []
        for gi in range(len(self.groups)):
            members = [b for b, g in zip(self.bounds, self.group_of, strict=True) if g == gi]
            self.group_bounds.append((members[0][0], members[-1][1]))

    @property
    def size(self) -> int:
        return self.bounds[-1][1] if self.bounds else 0

    @property
    def units(self) -> list[tuple[int, int]]:
        return self.bounds if self.per_param else self.group_bounds

    def elements(self, bounds: Sequence[tuple[int, int]]) -> np.ndarray:
        return np.array([e - s for s, e in bounds], dtype=np.float64)

    def sampled(self, bounds: Sequence[tuple[int, int]]) -> np.ndarray:
        """How many elements of each range the sign statistics count (ranges tile units end to end)."""
        return np.array([e - s for s, e in sample_ranges(self.units, bounds)], dtype=np.float64)

    @classmethod
    def build(cls, names: list[str], params: list[nn.Parameter], reach: list[list[bool]],
              grouper: Callable[[str], str], param_limit: int) -> SharedLayout:
        """Order the parameters so that every group's elements are contiguous (groups in first-seen order)."""
        labels = [str(grouper(n)) for n in names]
        groups = list(dict.fromkeys(labels))
        order = sorted(range(len(names)), key=lambda i: groups.index(labels[i]))
        return cls(
            names=[names[i] for i in order], params=[params[i] for i in order], groups=groups,
            group_of=[groups.index(labels[i]) for i in order], reach=[[r[i] for i in order] for r in reach],
            per_param=len(names) <= param_limit,
        )
