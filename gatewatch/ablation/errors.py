"""The two ways an ablation ends without a result: bad input, or a request to stop."""

from __future__ import annotations


class AblationError(ValueError):
    """Bad input for an ablation (run, checkpoint, factory, data, rates); the message says what to do."""


class AblationStopped(RuntimeError):
    """The job was asked to stop; nothing was written."""
