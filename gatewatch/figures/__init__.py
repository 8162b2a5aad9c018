"""Plotly figures of a run's tables: every function takes DataFrames (from ``gw.load_run``) and returns a
``plotly.graph_objects.Figure``. The dashboard draws only these; they work the same in a notebook::

    import gatewatch as gw
    from gatewatch import figures
    run = gw.load_run("runs/mmoe")
    figures.gate_curves(run.gates).show()

The figures of one quantity live in the modules its read half names (``ReadHalf.figures``: gates, experts,
routers, conflict, similarity and those of installed quantities); this namespace holds their public names
(each module's ``__all__``) next to the style helpers and the figures of comparisons and ablations.

Long runs are averaged in buckets of steps (at most ``MAX_POINTS`` points per line, ``MAX_COLUMNS`` heatmap
columns); each expert keeps one colour across charts.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import import_module
from typing import Any

from .. import registry
from ._style import MAX_COLUMNS, MAX_POINTS, downsample, expert_colours, nearest_step, no_data
from .ablation import comparison_figure, knockout_heatmap, removal_figure, sweep_curves
from .compare import (
    GATE_METRICS,
    compare_conflict,
    compare_eval,
    compare_gate_metric,
    compare_load_balance,
    loss_curves,
)

__all__ = [
    "GATE_METRICS", "MAX_COLUMNS", "MAX_POINTS", "compare_conflict", "compare_eval", "compare_gate_metric",
    "compare_load_balance", "comparison_figure", "downsample", "expert_colours", "knockout_heatmap", "loss_curves",
    "nearest_step", "no_data", "removal_figure", "sweep_curves",
]


@lru_cache(maxsize=8)
def _quantity_figures(registered: tuple[str, ...]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    where: dict[str, str] = {}
    for _, half in registry.declarations():
        for module_name in half.figures:
            module = import_module(module_name)
            for name in module.__all__:
                if name in where or name in __all__:
                    raise ValueError(f"gatewatch.figures.{name} is defined by both {where.get(name, __name__)} and "
                                     f"{module_name}. Rename one of them.")
                found[name], where[name] = getattr(module, name), module_name
    return found


def quantity_figures() -> dict[str, Any]:
    """The public figures of every registered quantity, by name."""
    return _quantity_figures(tuple(registry.QUANTITIES))


__all__ += sorted(quantity_figures())


def __getattr__(name: str) -> Any:  # a quantity registered after this module was imported
    try:
        return quantity_figures()[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *quantity_figures()})
