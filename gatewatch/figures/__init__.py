"""Plotly figures of a run's tables: every function takes DataFrames (from ``gw.load_run``) and returns a
``plotly.graph_objects.Figure``. The dashboard draws only these; they work the same in a notebook::

    import gatewatch as gw
    from gatewatch import figures
    run = gw.load_run("runs/mmoe")
    figures.gate_curves(run.gates).show()

Long runs are averaged in buckets of steps (at most ``MAX_POINTS`` points per line, ``MAX_COLUMNS`` heatmap
columns); each expert keeps one colour across charts.
"""

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
from .conflict import (
    NO_CONFLICT,
    conflict_counts,
    conflict_ranking,
    cosine_heatmap,
    cosine_over_time,
    expert_conflict_map,
    pairs,
    purity_distribution,
    sign_conflict_over_time,
)
from .experts import dead_experts, load_balance, utilization_at_step, utilization_by_task, utilization_over_time
from .gates import gate_curves, share_area, share_heatmap, task_expert_matrix, weight_histogram
from .routers import load_heatmap, max_violation_heatmap, router_curves, router_summary
from .similarity import similarity_matrix, similarity_over_time

__all__ = [
    "GATE_METRICS", "MAX_COLUMNS", "MAX_POINTS", "NO_CONFLICT", "compare_conflict", "compare_eval",
    "compare_gate_metric", "compare_load_balance", "comparison_figure", "conflict_counts", "conflict_ranking",
    "cosine_heatmap", "cosine_over_time", "dead_experts", "downsample", "expert_colours", "expert_conflict_map",
    "gate_curves",
    "knockout_heatmap", "load_balance", "load_heatmap", "loss_curves",
    "max_violation_heatmap", "nearest_step", "no_data", "pairs", "purity_distribution", "removal_figure",
    "router_curves", "router_summary", "share_area", "share_heatmap", "sign_conflict_over_time",
    "similarity_matrix", "similarity_over_time", "sweep_curves",
    "task_expert_matrix",
    "utilization_at_step", "utilization_by_task", "utilization_over_time", "weight_histogram",
]
