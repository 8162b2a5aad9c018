"""Ablations: what each expert is worth to each task, and whether gate dropout helps.

Evaluation time, on any model (the masks go through :mod:`gatewatch.masking`'s hooks):

* :func:`knockout` - remove each expert from each gate in turn; per task, the metric change against
  the unmasked model. Tidy columns: gate, gate_task, expert, expert_name, task, metric, base, ablated,
  delta (= ablated - base) and harm (delta signed so that positive is worse: -delta for AUC).
* :func:`dropout_sweep` - random per-sample gate dropout at several rates and seeds. Columns: rate,
  seed, task, metric, value, base (rate 0), delta, harm.

Training time: :func:`train_comparison` trains short runs of a run's model and data at several gate
dropout rates and seeds, with GateWatch attached, and compares their metrics and gate health;
:func:`task_removal` / :func:`run_task_removal` retrain without one task at a time (its loss weight 0) and
compare the remaining tasks' metrics with the full model's at the same seeds and budget (negative transfer).

On a run directory (a checkpoint saved by :mod:`gatewatch.training`): :func:`run_knockout`,
:func:`run_dropout_sweep`, :func:`train_comparison` load the model and data, validate everything,
and only then write ``RUN/ablations/<kind>.parquet`` (atomically; settings in the Parquet metadata).
A job reports progress in ``RUN/ablations/<kind>/progress.json`` and stops between steps when the file
``RUN/ablations/<kind>/stop`` appears (:func:`request_stop`); a stopped or failed job writes no result.

Modules: ``expert_knockout`` and ``sweep`` (evaluation time), ``comparison`` (training time),
``evaluation`` (a model's metrics), ``rates`` (rates and seeds), ``saved_run`` (a run
directory's model, gates and data), ``store`` (result files), ``jobs`` (progress and stop requests),
``summaries`` (the tables printed under each result), ``command`` (``gatewatch ablate``), ``errors``. The
public API (``__all__``) is importable from here; helpers shared between the modules are imported from the
module that holds them.

Importing this package loads no submodule: each name is imported from its module on first use, so the
command line and the dashboard read results, progress and defaults (``store``, ``jobs``, ``rates``,
``summaries``: no torch) without loading torch; the modules that run models load it when used.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the submodule of this package that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["add_ablate", "cmd_ablate", "render_summary"], "command"),
    **dict.fromkeys(["TRAIN_COLUMNS", "Comparison", "child_name", "child_rows", "gate_health", "train_comparison",
                     "_dropout_on_first_forward"], "comparison"),
    **dict.fromkeys(["AblationError", "AblationStopped"], "errors"),
    **dict.fromkeys(["EvalFn", "Metrics", "evaluator"], "evaluation"),
    **dict.fromkeys(["KNOCKOUT_COLUMNS", "chosen_experts", "knockout", "run_knockout"], "expert_knockout"),
    **dict.fromkeys(["Job", "JobState", "Progress", "StopFn", "Tracking", "job_dir", "job_state", "request_stop"],
                    "jobs"),
    **dict.fromkeys(["AUTO_LIMIT", "AUTO_PER_GATE", "DEFAULT_RATES", "DEFAULT_SEEDS", "REMOVAL_SEEDS", "TRAIN_RATES",
                     "TRAIN_SEEDS", "TRAIN_STEPS", "auto_per_gate", "check_rates", "knockout_plan",
                     "check_seeds", "parse_rates"], "rates"),
    **dict.fromkeys(["Target", "load_target", "run_gates"], "saved_run"),
    **dict.fromkeys(["KINDS", "META_KEY", "ablations_dir", "read_result", "result_path", "write_result"], "store"),
    **dict.fromkeys(["comparison_summary", "knockout_summary", "removal_summary", "sweep_summary"], "summaries"),
    **dict.fromkeys(["SWEEP_COLUMNS", "dropout_sweep", "run_dropout_sweep"], "sweep"),
    **dict.fromkeys(["REMOVAL_COLUMNS", "check_drop", "run_task_removal", "task_removal"], "task_removal"),
}
# which way a metric is worse: shared with the figures, so it lives outside this package
_OUTSIDE = {"HIGHER_IS_BETTER": "gatewatch.metric_direction", "PRIMARY_METRICS": "gatewatch.metric_direction",
            "harm": "gatewatch.metric_direction", "primary_metric": "gatewatch.metric_direction"}

__all__ = sorted(name for name in (*_EXPORTS, *_OUTSIDE) if not name.startswith("_"))


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use (see the module docstring)."""
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    elif name in _OUTSIDE:
        module = importlib.import_module(_OUTSIDE[name])
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
