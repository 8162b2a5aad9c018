"""Where a watch's numbers go. The run directory is the source of truth; every other sink mirrors it.

A sink receives, on rank 0 only and at flush time only:

* :meth:`Sink.write` - the rows of one flush, as tidy tables (``gatewatch.schema``);
* :meth:`Sink.write_meta` - the run's metadata (``run.json``), after each flush and at close;
* :meth:`Sink.log_findings` - the findings of the recent windows, when ``wants_findings`` is True;
* :meth:`Sink.close` - once, with the report of the recent windows (same keys as ``gatewatch report --json``).

A sink never raises into training: it catches its own failures, warns once and records them.
``GateWatch(..., sinks=[MySink()])`` adds sinks to the run directory and TensorBoard.

Trackers: :class:`~gatewatch.sinks.mlflow.MLflowSink` (``pip install 'gatewatch[mlflow]'``) and
:class:`~gatewatch.sinks.wandb.WandbSink` (``pip install 'gatewatch[wandb]'``), importable from here; their
packages are imported only when one is used. The scalars they chart are those of TensorBoard
(:func:`gatewatch.sinks.scalars.scalars`).
"""

from __future__ import annotations

from typing import Any

import pandas as pd


class Sink:
    """The sink protocol, with methods that do nothing: subclass it and override what you need."""

    wants_findings = False  # True: the watch evaluates the finding rules at each flush for this sink

    def write(self, tables: dict[str, pd.DataFrame]) -> bool:
        """Store the rows of one flush; False when it failed (the sink keeps them to retry)."""
        return True

    def write_meta(self, meta: dict[str, Any]) -> bool:
        """Store the run's metadata."""
        return True

    def log_findings(self, step: int, findings: list[dict[str, Any]]) -> None:
        """The findings of the recent windows at ``step`` (each as ``Finding.to_dict()``)."""

    def close(self, report: dict[str, Any] | None = None) -> None:
        """Write what is left and release the sink; ``report`` covers the recent windows of the run."""


_TRACKERS = {"MLflowSink": "mlflow", "WandbSink": "wandb"}  # class -> module of this package (imported on use)


def __getattr__(name: str) -> Any:
    if name in _TRACKERS:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_TRACKERS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MLflowSink", "Sink", "WandbSink"]
