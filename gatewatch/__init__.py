"""gatewatch: see what the gates of multi-task mixture-of-experts models do while they train.

``import gatewatch`` is light: the names below load their module (and torch, for the capture side) on
first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_NAMES = {
    "GateWatch": "watch", "Gate": "gating.specs", "Router": "gating.router_table",
    "FusedExperts": "gating.fused_experts",
    "GateDiscoveryError": "gating.specs", "GateOutputError": "gating.specs", "NonFiniteGateError": "gating.specs",
    "Finding": "rules", "Thresholds": "rules", "find": "findings", "build_report": "report", "Run": "loaded_run",
    "RunReadError": "run_reader", "list_runs": "run_reader", "load_run": "run_reader",
    "run_summaries": "summary_cache", "Guard": "guard",
}
_SUBMODULES = ("remedies", "masking", "models", "data", "training", "ablation", "integrations", "sinks", "figures",
               "quantities", "schema", "findings", "report", "run_reader")

if TYPE_CHECKING:
    from . import remedies as remedies
    from .findings import find as find
    from .gating.fused_experts import FusedExperts as FusedExperts
    from .gating.router_table import Router as Router
    from .gating.specs import Gate as Gate
    from .gating.specs import GateDiscoveryError as GateDiscoveryError
    from .gating.specs import GateOutputError as GateOutputError
    from .gating.specs import NonFiniteGateError as NonFiniteGateError
    from .guard import Guard as Guard
    from .loaded_run import Run as Run
    from .report import build_report as build_report
    from .rules import Finding as Finding
    from .rules import Thresholds as Thresholds
    from .run_reader import RunReadError as RunReadError
    from .run_reader import list_runs as list_runs
    from .run_reader import load_run as load_run
    from .summary_cache import run_summaries as run_summaries
    from .watch import GateWatch as GateWatch


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(import_module(f"{__name__}.{_NAMES[name]}"), name)
    elif name in _SUBMODULES:
        value = import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'gatewatch' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES, *_SUBMODULES])


__all__ = [
    "Finding", "FusedExperts", "Gate", "GateDiscoveryError", "GateOutputError", "GateWatch", "Guard",
    "NonFiniteGateError", "Router", "Run", "RunReadError", "Thresholds", "__version__", "build_report", "find",
    "list_runs", "load_run", "run_summaries",
]
