"""The seesaw has nothing to capture: it reads the ``eval`` table (``watch.log_metrics`` and the training loop)."""

from __future__ import annotations

from typing import Any

from ...capture.quantity import CaptureContext

KEYWORDS: dict[str, Any] = {}


def build(ctx: CaptureContext) -> None:
    """No capture half (see the module docstring)."""
    return None
