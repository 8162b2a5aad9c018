"""Training with GateWatch attached: data sets by name, the loop, evaluation, checkpoints, the demo.

Importing this package loads no submodule: each name is imported from its module on first use, so
``gatewatch.training.model_info`` (what a run saved, no torch) and the ``gatewatch demo`` options load
without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the submodule of this package that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["CheckpointError", "ModelInfo", "read_model_info"], "model_info"),
    **dict.fromkeys(["load_model", "save_model"], "checkpoint"),
    **dict.fromkeys(["DATASETS", "Splits", "load_dataset", "load_ref"], "datasets"),
    **dict.fromkeys(["MODELS", "TrainConfig", "TrainResult", "build_model", "train"], "loop"),
    **dict.fromkeys(["evaluate", "roc_auc"], "metrics"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use (see the module docstring)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
