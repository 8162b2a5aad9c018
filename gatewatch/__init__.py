"""gatewatch: see what the gates of multi-task mixture-of-experts models do while they train."""

__version__ = "0.1.0"

from .findings import Finding, Thresholds, find
from .gates import Gate, GateDiscoveryError, GateOutputError, NonFiniteGateError
from .report import build_report
from .runs import Run, RunReadError, list_runs, load_run
from .watch import GateWatch

__all__ = [
    "Finding", "Gate", "GateDiscoveryError", "GateOutputError", "GateWatch", "NonFiniteGateError", "Run",
    "RunReadError", "Thresholds", "__version__", "build_report", "find", "list_runs", "load_run",
]
