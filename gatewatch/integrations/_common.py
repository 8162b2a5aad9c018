"""What the framework callbacks share: the per-task loss convention and building the GateWatch."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..validate import positive_int
from ..watch import GateWatch, Losses, quantity_keywords

TASK_LOSSES = "task_losses"
_OWN_ARGS = {"model", "tasks", "gates", "log_dir", "every", "flush_every"}


def task_losses(output: Any, module: nn.Module) -> Losses | None:
    """The per-task losses of one training step, by the convention of :mod:`gatewatch.integrations`.

    ``output["task_losses"]`` when the step returned a dict holding it; otherwise ``module.task_losses``,
    which is then reset to None so a value is never logged twice. None when neither is there.
    """
    if isinstance(output, Mapping) and output.get(TASK_LOSSES) is not None:
        return output[TASK_LOSSES]
    found = getattr(module, TASK_LOSSES, None)
    if found is not None:
        setattr(module, TASK_LOSSES, None)
    return found


def missing_losses_message(where: str) -> str:
    return (
        f"gatewatch found no per-task losses: {where} should return a dict with 'loss' and "
        f"'{TASK_LOSSES}': {{task: loss}}, or set self.{TASK_LOSSES} = {{task: loss}}. The gates are still watched; "
        "the run has no loss curves."
    )


def check_group_field(owner: str, field: str | None, watch_kwargs: dict[str, Any]) -> str | None:
    """``group_field``, checked: a batch field name, given together with ``sample_groups``."""
    if field is None:
        return None
    if not isinstance(field, str) or not field:
        raise TypeError(f"{owner}: group_field is the name of the batch field holding each sample's group, got "
                        f"{field!r}.")
    if watch_kwargs.get("sample_groups") is None:
        raise ValueError(f"{owner}(group_field={field!r}) needs the group names too: pass sample_groups=[...] "
                         "(e.g. ['code', 'maths', 'chat']); the field's values index them.")
    return field


def batch_field(batch: Any, field: str, owner: str) -> Any:
    """The sample-group labels of a training batch: ``batch[field]`` (a mapping) or ``batch.field``."""
    if isinstance(batch, Mapping):
        if field in batch:
            return batch[field]
        have = sorted(map(str, batch))
    elif hasattr(batch, field):
        return getattr(batch, field)
    else:
        have = [n for n in dir(batch) if not n.startswith("_")][:20]
    raise KeyError(f"{owner}(group_field={field!r}): the training batch ({type(batch).__name__}) has no field "
                   f"{field!r}; it has {have}. Put each sample's group index there (an integer tensor [B] or "
                   f"[B, S], -1 to leave a row out), or pass the name it has.")


class WatchSpec:
    """The arguments of the GateWatch a callback creates once training starts, checked right away."""

    def __init__(
        self, owner: str, *, tasks: Sequence[str] | None, gates: Any, module: str | None,
        log_dir: str | os.PathLike[str] | None, every: int, flush_every: int, watch_kwargs: dict[str, Any],
    ) -> None:
        for name, value in (("every", every), ("flush_every", flush_every)):
            positive_int(name, value, unit="steps", owner=owner)
        signature = inspect.signature(GateWatch.__init__).parameters
        known = {n for n, p in signature.items() if p.kind is p.KEYWORD_ONLY} - _OWN_ARGS | set(quantity_keywords())
        unknown = sorted(set(watch_kwargs) - known)
        if unknown:
            raise TypeError(f"{owner} got unknown GateWatch arguments {unknown}; known: {sorted(known)}.")
        if module is not None and not isinstance(module, str):
            raise TypeError(f"{owner}: module= is the dotted path of a submodule (e.g. 'model'), got "
                            f"{type(module).__name__}.")
        self.owner, self.tasks, self.gates, self.module = owner, tasks, gates, module
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.every, self.flush_every, self.watch_kwargs = every, flush_every, dict(watch_kwargs)

    def target(self, root: nn.Module) -> nn.Module:
        """The module to watch: ``root`` itself, or its submodule at ``module``."""
        if self.module is None:
            return root
        try:
            return root.get_submodule(self.module)
        except AttributeError as err:
            children = [name for name, _ in root.named_children()]
            raise AttributeError(f"{self.owner}: {type(root).__name__} has no submodule {self.module!r}; its "
                                 f"children are {children}.") from err

    def build(self, root: nn.Module, default_dir: Path, **overrides: Any) -> GateWatch:
        """Create the GateWatch on ``root`` (or its submodule), logging to ``log_dir`` or ``default_dir``."""
        kwargs = {**self.watch_kwargs, **overrides}
        return GateWatch(self.target(root), tasks=self.tasks, gates=self.gates, log_dir=self.log_dir or default_dir,
                         every=self.every, flush_every=self.flush_every, **kwargs)
