"""Save a trained model into its run directory and rebuild it later (ablations, the dashboard).

A run directory gets two files, each written atomically (temporary name, then rename):

* ``checkpoint.pt``: the model's ``state_dict()`` (tensors only), written with ``torch.save``;
* ``model.json``: how to rebuild the model::

      {"format": "gatewatch-model/1", "factory": "pkg.module:Attr", "kwargs": {...},
       "tasks": [...], "task_types": [...], "data": {"name": ..., "kwargs": {...}} | null}

Loading uses ``torch.load(..., map_location="cpu", weights_only=True)`` only: a checkpoint that needs
pickle to load is refused, never loaded unsafely.

Safety rule for rebuilding. A run directory is data: anyone can write one, so the factory named in
its ``model.json`` is *not* trusted by default. :func:`load_model` imports and calls it only when

1. it names an ``nn.Module`` subclass inside the ``gatewatch`` package (public modules only, never a
   ``__main__``), e.g. ``gatewatch.models.mmoe:MMoE``; the module is imported first (importing a
   gatewatch module has no side effects) and the class is checked *before* it is called; or
2. the caller passes ``allow_factory=True`` (the user chose to run that run's own code); or
3. the caller names the factory itself (``factory="my_pkg.models:build"``): it is then the caller's
   code, not the run directory's.

Anything else raises :class:`CheckpointError` saying which of these to use. The dashboard follows the
same rule: it rebuilds a run with a non-gatewatch factory only after the user explicitly allows it.

Reading ``model.json`` and the trust rule need no torch: they live in :mod:`gatewatch.training.model_info`.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import import_factory
from ..run_format import atomic_write_bytes, atomic_write_json
from .metrics import check_task_types
from .model_info import (
    CHECKPOINT_FILE,
    MODEL_FILE,
    MODEL_FORMAT,
    TRUSTED_PACKAGE,
    CheckpointError,
    ModelInfo,
    is_trusted_factory,
    read_model_info,
)

__all__ = [
    "CHECKPOINT_FILE", "MODEL_FILE", "MODEL_FORMAT", "TRUSTED_PACKAGE", "CheckpointError", "ModelInfo",
    "check_state_dict", "is_trusted_factory", "load_model", "read_model_info", "read_state_dict", "resolve_factory",
    "save_model",
]

_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_LISTED = 8  # keys listed per kind in a state-dict mismatch message


# ---------------------------------------------------------------------------------------------- saving
def _json_safe(name: str, value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{name} must hold JSON values only (numbers, strings, lists, dicts): {err}.") from err


def save_model(
    run_dir: str | os.PathLike[str],
    model: nn.Module,
    *,
    factory: Mapping[str, Any] | None,
    data: Mapping[str, Any] | None,
    tasks: Sequence[str],
    task_types: Sequence[str],
) -> Path:
    """Write ``checkpoint.pt`` and ``model.json`` into ``run_dir``; return the checkpoint's path.

    ``factory`` is ``{"factory": "pkg.module:Attr", "kwargs": {...}}`` as made by
    :func:`gatewatch.models.factory_ref`, or None when the model cannot be rebuilt from a reference
    (``load_model`` then needs ``factory=``). ``data`` is the data set's reference (see
    :mod:`gatewatch.training.datasets`) or None.
    """
    check_task_types(tasks, task_types)
    ref: str | None = None
    kwargs: dict[str, Any] = {}
    if factory is not None:
        ref = factory.get("factory") if isinstance(factory, Mapping) else None
        if not isinstance(ref, str) or not _FACTORY.match(ref):
            raise CheckpointError(
                f"factory must be {{'factory': 'pkg.module:Attr', 'kwargs': {{...}}}}, got {factory!r}."
            )
        kwargs = _json_safe("factory kwargs", dict(factory.get("kwargs") or {}))
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    atomic_write_bytes(path / CHECKPOINT_FILE, buffer.getvalue())
    atomic_write_json(path / MODEL_FILE, {
        "format": MODEL_FORMAT, "factory": ref, "kwargs": kwargs, "tasks": [str(t) for t in tasks],
        "task_types": list(task_types), "data": _json_safe("data", dict(data)) if data is not None else None,
    })
    return path / CHECKPOINT_FILE


# ---------------------------------------------------------------------------------------------- loading
def resolve_factory(factory: str, *, trusted: bool) -> Any:
    """Import ``pkg.module:Attr`` and return the attribute; untrusted references must be gatewatch modules."""
    if not isinstance(factory, str) or not _FACTORY.match(factory):
        raise CheckpointError(
            f"model factory {factory!r} is not of the form 'module:function' (e.g. 'gatewatch.models.mmoe:MMoE')."
        )
    if not trusted and not is_trusted_factory(factory):
        raise CheckpointError(
            f"model.json names the factory {factory!r}, outside the gatewatch package's models (gatewatch.models). "
            "Rebuilding it would import and run code named by the run directory; pass allow_factory=True if you "
            "trust this run, or pass "
            "factory='module:function' yourself."
        )
    try:
        target = import_factory(factory)
    except ImportError as err:
        raise CheckpointError(f"cannot import the module of model factory {factory!r}: {err}.") from err
    except AttributeError as err:
        raise CheckpointError(f"model factory {factory!r}: {err}.") from err
    if not callable(target):
        raise CheckpointError(f"model factory {factory!r} is {type(target).__name__}, not a callable.")
    if not trusted and not (isinstance(target, type) and issubclass(target, nn.Module)):
        raise CheckpointError(
            f"model factory {factory!r} is not an nn.Module class; only gatewatch model classes are rebuilt "
            "without permission. Pass allow_factory=True if you trust this run."
        )
    return target


def _build(factory: str, target: Any, kwargs: dict[str, Any]) -> nn.Module:
    try:
        inspect.signature(target).bind(**kwargs)
    except TypeError as err:
        raise CheckpointError(f"model factory {factory!r} does not accept kwargs {sorted(kwargs)}: {err}.") from err
    except ValueError:  # no signature available (some builtins): let the call decide
        pass
    try:
        model = target(**kwargs)
    except Exception as err:
        raise CheckpointError(
            f"model factory {factory!r} failed with kwargs {kwargs}: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"model factory {factory!r} returned {type(model).__name__}, not an nn.Module.")
    return model


def _unpickler_detail(message: str) -> str:
    """The reason in torch's weights-only error message (its long advice about unsafe loading left out)."""
    _, found, rest = message.partition("WeightsUnpickler error:")
    text = " ".join(rest.split()) if found else " ".join(message.split())
    return text.split(". ")[0].rstrip(".")


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``file``, loaded with ``weights_only=True`` (tensors and plain containers only)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _unpickler_detail(str(err))
        if "Unsupported global" not in detail:
            raise CheckpointError(f"{file} is not a readable PyTorch checkpoint ({detail}).") from err
        raise CheckpointError(
            f"{file} holds objects that need pickle to load (not just tensors); gatewatch loads checkpoints with "
            "weights_only=True only and refuses it. Re-save the model with save_model() or "
            f"torch.save(model.state_dict(), path). Detail: {detail}"
        ) from err
    except (RuntimeError, OSError, EOFError) as err:
        raise CheckpointError(f"{file} is not a readable PyTorch checkpoint: {err}.") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file} is not a state dict (a dict of tensors); re-save it with save_model().")
    return state


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], file: Path) -> None:
    """Raise CheckpointError naming missing / unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if not (missing or unexpected or shapes):
        return
    parts = [f"{label} ({len(items)}): {', '.join(items[:_LISTED])}{' ...' if len(items) > _LISTED else ''}"
             for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                  ("shape mismatches", shapes)) if items]
    raise CheckpointError(
        f"{file} does not fit the rebuilt {type(model).__name__}: this checkpoint was written by a different "
        f"architecture (or different constructor kwargs). {'; '.join(parts)}."
    )


def load_model(
    run_dir: str | os.PathLike[str],
    factory: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    *,
    allow_factory: bool = False,
) -> tuple[nn.Module, ModelInfo]:
    """Rebuild the model saved in ``run_dir`` and load its weights (eval mode, on the CPU).

    ``factory`` ("module:function") and ``kwargs`` override ``model.json``; kwargs default to the
    ones in ``model.json``. See the module docstring for when a factory from ``model.json`` is trusted.
    """
    path = Path(run_dir)
    file = path / CHECKPOINT_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass a run directory written by gatewatch.training.train().")
    if not file.is_file():
        raise CheckpointError(
            f"{path} has no {CHECKPOINT_FILE}: the run saved no model. Train it with gatewatch.training.train() "
            "(or call save_model() at the end of your own loop) to make ablations possible."
        )
    info = read_model_info(path) or ModelInfo(path=path, factory=None)
    name = factory or info.factory
    if name is None:
        raise CheckpointError(
            f"{path} has no {MODEL_FILE} naming a model factory, so the model cannot be rebuilt. Pass "
            "factory='module:function' (and kwargs=) that build the model, e.g. factory='my_pkg.models:build'."
        )
    build_kwargs = dict(kwargs) if kwargs is not None else dict(info.kwargs)
    target = resolve_factory(name, trusted=factory is not None or allow_factory)
    model = _build(name, target, build_kwargs)
    state = read_state_dict(file)
    check_state_dict(model, state, file)
    model.load_state_dict(state)
    model.eval()
    info.factory, info.kwargs = name, build_kwargs
    return model, info
