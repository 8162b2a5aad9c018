"""GateWatch's arguments, checked once: each bad value fails with a message that names the fix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..registry import capture_halves
from ..validate import positive_int
from .flush import ON_NONFINITE
from .quantity import CaptureContext, Quantity

BUILT_IN = "gatewatch.quantities."


def quantity_keywords() -> dict[str, Any]:
    """Every registered quantity's own keywords of ``GateWatch(...)``, with their defaults."""
    return {k: v for half in capture_halves() for k, v in half.KEYWORDS.items()}


def build_quantities(ctx: CaptureContext) -> dict[str, Quantity | None]:
    """Every registered quantity's capture half built for ``ctx``, by its registry name (``"gates"``,
    ``"my_pkg.my_quantity"``); None where ``build`` left it off."""
    return {half.__name__.removesuffix(".capture").removeprefix(BUILT_IN): half.build(ctx)
            for half in capture_halves()}


@dataclass(frozen=True)
class Settings:
    """The checked arguments of one watch."""

    tasks: list[str] | None
    every: int
    flush_every: int
    flush_secs: float | None
    threshold: float
    bins: int
    margin: float
    options: dict[str, Any]  # the quantities' own keywords, defaults filled in

    def recorded(self) -> dict[str, Any]:
        """What run.json's ``config`` records."""
        return {"every": self.every, "flush_every": self.flush_every, "flush_secs": self.flush_secs,
                "threshold": self.threshold, "bins": self.bins, "margin": self.margin}


def check(model: Any, *, tasks: Sequence[str] | None, every: Any, flush_every: Any, flush_secs: float | None,
          threshold: float, bins: Any, margin: float, on_nonfinite: str, options: dict[str, Any]) -> Settings:
    """The settings of a watch; raises on a bad argument."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"GateWatch needs an nn.Module, got {type(model).__name__}.")
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}.")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold is a gate weight in (0, 1], got {threshold}.")
    if flush_secs is not None and not flush_secs > 0:
        raise ValueError(f"flush_secs must be a positive number of seconds (or None: flush by steps only), got "
                         f"{flush_secs!r}.")
    known = quantity_keywords()
    if unknown := sorted(set(options) - set(known)):
        raise TypeError(f"GateWatch got unknown keywords {unknown}; the quantities take {sorted(known)}.")
    names = None if tasks is None else [str(t) for t in tasks]
    if names is not None and (len(set(names)) != len(names) or not names):
        raise ValueError(f"tasks must be distinct, non-empty names; got {names}.")
    return Settings(names, positive_int("every", every, unit="steps"),
                    positive_int("flush_every", flush_every, unit="steps"), flush_secs, threshold,
                    positive_int("bins", bins), margin, {**known, **options})
