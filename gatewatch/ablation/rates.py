"""Gate dropout rates, seeds and steps, and how many experts a knock-out takes: the defaults, their checks, and
how they are written on the command line (no torch: the command line and the dashboard read them without loading
a model)."""

from __future__ import annotations

from collections.abc import Iterable

from ..validate import is_dropout_rate, non_negative_int
from .errors import AblationError

DEFAULT_RATES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)  # evaluation-time sweep
DEFAULT_SEEDS = (0, 1, 2)
TRAIN_RATES = (0.0, 0.1, 0.2)  # training comparison
TRAIN_SEEDS = (0, 1)
REMOVAL_SEEDS = (0, 1, 2)  # seeds of a task removal: its spread is the standard error over them
TRAIN_STEPS = 1000  # default length of a comparison run (capped by the run's own length)
AUTO_LIMIT = 256  # knock-outs of a saved run beyond which the default is the AUTO_PER_GATE ends of each gate
AUTO_PER_GATE = 2


def knockout_plan(gates: Iterable[tuple[str, int]], only: Iterable[str] | None, per_gate: int | None,
                  experts: Iterable[int] | None = None) -> int:
    """The evaluations a knock-out takes on gates of these ``(name, experts)``: every expert of the gates in
    ``only`` (all gates when None), the ``per_gate`` most and least loaded of each, or the ``experts`` given."""
    named = set(only) if only is not None else None
    chosen = len(set(experts)) if experts is not None else None
    return sum(chosen if chosen is not None else n if per_gate is None else min(n, 2 * per_gate)
               for name, n in gates if named is None or name in named)


def auto_per_gate(gates: Iterable[tuple[str, int]], only: Iterable[str] | None) -> int | None:
    """The knock-out's default bound: None (every expert) when that is at most :data:`AUTO_LIMIT` evaluations,
    else :data:`AUTO_PER_GATE`."""
    gates = list(gates)
    return None if knockout_plan(gates, only, None) <= AUTO_LIMIT else AUTO_PER_GATE


def check_rates(rates: Iterable[float]) -> list[float]:
    """Distinct dropout rates in [0, 1), sorted; raises AblationError otherwise."""
    out = []
    for r in rates:
        if not is_dropout_rate(r):
            raise AblationError(f"A gate dropout rate is a number in [0, 1), got {r!r}.")
        out.append(float(r))
    if not out:
        raise AblationError("Give at least one gate dropout rate, e.g. 0,0.1,0.2.")
    return sorted(set(out))


def check_seeds(seeds: Iterable[int]) -> list[int]:
    """Distinct non-negative integer seeds, in the order given; raises AblationError otherwise."""
    out = list(seeds)
    if not out:
        raise AblationError("Give at least one seed, e.g. 0,1,2.")
    try:
        checked = [non_negative_int("each seed", s) for s in out]
    except ValueError as err:
        raise AblationError(str(err)) from None
    return list(dict.fromkeys(checked))


def parse_rates(text: str) -> list[float]:
    """Rates from comma-separated text (``"0,0.1,0.2"``), checked by :func:`check_rates`."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise AblationError(f"Rates are comma-separated numbers in [0, 1), e.g. 0,0.1,0.2; got {text!r}.") from err
    return check_rates(values)


def format_rates(rates: Iterable[float]) -> str:
    """The comma-separated text :func:`parse_rates` reads (``0,0.1,0.2``)."""
    return ",".join(f"{r:g}" for r in rates)
