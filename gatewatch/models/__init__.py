"""Reference multi-task models (MMoE, OMoE, shared-bottom, CGC, PLE, a sparse MoE) and how to rebuild them.

``factory_ref(model)`` records ``{"factory": "pkg.module:Class", "kwargs": model.config}`` (JSON
values only); ``build(ref)`` imports the factory and calls it with the kwargs. ``build`` imports
whatever module the reference names: only build references you trust (e.g. your own run
directories).
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from torch import nn

from gatewatch.models.blocks import MLP
from gatewatch.models.mmoe import MMoE, OMoE, SharedBottom
from gatewatch.models.ple import CGC, PLE
from gatewatch.models.sparse import SparseMoE

__all__ = ["CGC", "MLP", "PLE", "MMoE", "OMoE", "SharedBottom", "SparseMoE", "build", "factory_ref"]

_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def factory_ref(model: nn.Module) -> dict[str, Any]:
    """``{"factory": "module:QualName", "kwargs": {...}}`` for a model that keeps its kwargs in ``config``."""
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise ValueError(f"{type(model).__name__} has no dict `config` of constructor kwargs to record")
    cls = type(model)
    return {"factory": f"{cls.__module__}:{cls.__qualname__}", "kwargs": dict(config)}


def import_factory(factory: str) -> Any:
    """The attribute named by ``pkg.module:attr`` (attr may be dotted); ImportError or AttributeError when absent."""
    module_name, attr_path = factory.split(":")
    target: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        target = getattr(target, attr)
    return target


def _resolve(factory: str) -> Any:
    """Import ``pkg.module:attr`` (attr may be dotted) and return the attribute."""
    try:
        target = import_factory(factory)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot resolve model factory {factory!r}: {exc}") from exc
    if not callable(target):
        raise ValueError(f"model factory {factory!r} is not callable")
    return target


def build(ref: dict[str, Any]) -> nn.Module:
    """Rebuild a model from ``{"factory": "pkg.module:attr", "kwargs": {...}}`` (kwargs optional)."""
    if not isinstance(ref, dict):
        raise ValueError(
            f"model reference must be a dict with 'factory' and 'kwargs', got {type(ref).__name__}"
        )
    factory = ref.get("factory")
    if not isinstance(factory, str) or not _FACTORY.match(factory):
        raise ValueError(f"model reference 'factory' must look like 'pkg.module:attr', got {factory!r}")
    kwargs = ref.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ValueError(f"model reference 'kwargs' must be a dict, got {type(kwargs).__name__}")
    return _resolve(factory)(**kwargs)
