"""The opt-in online guard's settings: ``GateWatch(..., guard=gw.Guard(...))``.

At each flush the guard runs the chosen finding rules (``polarization``, ``collapse``: the pure rules of
``gatewatch.quantities.gates.read``) on the windows just reduced, so under DDP every rank decides the same.
When one fires it applies gate dropout at ``dropout`` to the gates concerned (the polarized gate, or every
gate on collapse) through :mod:`gatewatch.masking` hooks, in training mode only. ``revert_after=N`` windows, or
``watch.guard.revert()``, removes it again. Each action is an event of the run (the ``events`` table and
run.json's ``guard``) with the gate's numbers in the window before and the window after. Without ``guard=``
nothing of this runs and training is untouched. The work is done by ``gatewatch.quantities.guard``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .validate import dropout_rate, positive_int

GUARDED_RULES = ("polarization", "collapse")


@dataclass(frozen=True)
class Guard:
    """Which findings trigger gate dropout, at what rate, and for how many windows (None: until revert())."""

    rules: tuple[str, ...] = GUARDED_RULES
    dropout: float = 0.1
    revert_after: int | None = None

    def __post_init__(self) -> None:
        rules = (self.rules,) if isinstance(self.rules, str) else tuple(self.rules)
        unknown = sorted(set(rules) - set(GUARDED_RULES))
        if unknown or not rules:
            raise ValueError(f"Guard(rules=...) takes some of {list(GUARDED_RULES)}; got {list(rules)}.")
        object.__setattr__(self, "rules", rules)
        rate = dropout_rate("dropout", self.dropout, owner="Guard")
        if rate == 0:
            raise ValueError("Guard(dropout=0) would do nothing: pass a rate such as 0.1, or leave guard= out.")
        if self.revert_after is not None:
            positive_int("revert_after", self.revert_after, unit="windows", owner="Guard")

    def describe(self) -> dict[str, Any]:
        return {"rules": list(self.rules), "dropout": self.dropout, "revert_after": self.revert_after}
