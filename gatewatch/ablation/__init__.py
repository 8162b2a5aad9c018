"""Ablations: what each expert is worth to each task, and whether gate dropout helps.

Evaluation time, on any model (the masks go through :mod:`gatewatch.masking`'s hooks):

* :func:`knockout` - remove each expert from each gate in turn; per task, the metric change against
  the unmasked model. Tidy columns: gate, gate_task, expert, expert_name, task, metric, base, ablated,
  delta (= ablated - base) and harm (delta signed so that positive is worse: -delta for AUC).
* :func:`dropout_sweep` - random per-sample gate dropout at several rates and seeds. Columns: rate,
  seed, task, metric, value, base (rate 0), delta, harm.

Training time: :func:`train_comparison` trains short runs of a run's model and data at several gate
dropout rates and seeds, with GateWatch attached, and compares their metrics and gate health.

On a run directory (a checkpoint saved by :mod:`gatewatch.training`): :func:`run_knockout`,
:func:`run_dropout_sweep`, :func:`train_comparison` load the model and data, validate everything,
and only then write ``RUN/ablations/<kind>.parquet`` (atomically; settings in the Parquet metadata).
A job reports progress in ``RUN/ablations/<kind>/progress.json`` and stops between steps when the file
``RUN/ablations/<kind>/stop`` appears (:func:`request_stop`); a stopped or failed job writes no result.

Modules: ``expert_knockout`` and ``sweep`` (evaluation time), ``comparison`` (training time),
``evaluation`` (metrics and which way is worse), ``rates`` (rates and seeds), ``saved_run`` (a run
directory's model, gates and data), ``store`` (result files), ``jobs`` (progress and stop requests),
``command`` (``gatewatch ablate``), ``errors``. The public API (``__all__``) is importable from here;
helpers shared between the modules are imported from the module that holds them.
"""

from .command import add_ablate, cmd_ablate, render_summary
from .comparison import (
    TRAIN_COLUMNS,
    TRAIN_STEPS,
    Comparison,
    child_name,
    child_rows,
    comparison_summary,
    gate_health,
    train_comparison,
)
from .comparison import _dropout_on_first_forward as _dropout_on_first_forward  # imported by the tests
from .errors import AblationError, AblationStopped
from .evaluation import HIGHER_IS_BETTER, PRIMARY_METRICS, EvalFn, Metrics, evaluator, harm, primary_metric
from .expert_knockout import KNOCKOUT_COLUMNS, knockout, knockout_summary, run_knockout
from .jobs import Job, JobState, Progress, StopFn, Tracking, job_dir, job_state, request_stop
from .rates import DEFAULT_RATES, DEFAULT_SEEDS, TRAIN_RATES, check_rates, check_seeds, parse_rates
from .saved_run import Target, load_target, run_gates
from .store import KINDS, META_KEY, ablations_dir, read_result, result_path, write_result
from .sweep import SWEEP_COLUMNS, dropout_sweep, run_dropout_sweep, sweep_summary

__all__ = [
    "DEFAULT_RATES", "DEFAULT_SEEDS", "HIGHER_IS_BETTER", "KINDS", "KNOCKOUT_COLUMNS", "META_KEY", "PRIMARY_METRICS",
    "SWEEP_COLUMNS", "TRAIN_COLUMNS", "TRAIN_RATES", "TRAIN_STEPS", "AblationError", "AblationStopped", "Comparison",
    "EvalFn", "Job", "JobState", "Metrics", "Progress", "StopFn", "Target", "Tracking", "ablations_dir", "add_ablate",
    "check_rates", "check_seeds", "child_name", "child_rows", "cmd_ablate", "comparison_summary", "dropout_sweep",
    "evaluator", "gate_health", "harm", "job_dir", "job_state", "knockout", "knockout_summary", "load_target",
    "parse_rates", "primary_metric", "read_result", "render_summary", "request_stop", "result_path",
    "run_dropout_sweep", "run_gates", "run_knockout", "sweep_summary", "train_comparison", "write_result",
]
