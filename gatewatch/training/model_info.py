"""What a run directory says about its saved model, read without torch: ``model.json``, the checkpoint's file
name, and whether its factory may be imported without asking (see :mod:`gatewatch.training.checkpoint`).

The dashboard reads these to offer ablations; rebuilding the model (:func:`gatewatch.training.load_model`) is
done by ``gatewatch ablate``, which loads torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_FORMAT = "gatewatch-model/1"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.json"
TRUSTED_PACKAGE = "gatewatch.models"


class CheckpointError(ValueError):
    """A checkpoint cannot be saved or rebuilt; the message says why and what to do."""


@dataclass
class ModelInfo:
    """What ``model.json`` says about a saved model (plus where it came from)."""

    path: Path
    factory: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)
    task_types: list[str] = field(default_factory=list)
    data: dict[str, Any] | None = None


def read_model_info(run_dir: str | os.PathLike[str]) -> ModelInfo | None:
    """``model.json`` of a run directory, or None when there is none."""
    path = Path(run_dir)
    file = path / MODEL_FILE
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text())
        if not isinstance(meta, dict):
            raise ValueError("the top level is not a JSON object")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file} is not readable JSON ({err}); rewrite it or pass factory= and kwargs=.") from err
    kwargs = meta.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{file}: 'kwargs' must be a JSON object, got {type(kwargs).__name__}.")
    factory = meta.get("factory")
    return ModelInfo(
        path=path, factory=factory if isinstance(factory, str) else None, kwargs=kwargs,
        tasks=[str(t) for t in meta.get("tasks") or []], task_types=[str(t) for t in meta.get("task_types") or []],
        data=meta.get("data") if isinstance(meta.get("data"), dict) else None,
    )


def is_trusted_factory(factory: str) -> bool:
    """True when ``factory`` may be imported without permission: a public module of ``gatewatch.models``
    (importing any other module, even of gatewatch, could run code a run directory chose)."""
    module = factory.partition(":")[0].split(".")
    return module[:2] == TRUSTED_PACKAGE.split(".") and not any(part.startswith("_") for part in module[2:])
