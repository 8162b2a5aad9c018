"""``gatewatch ablate``: one ablation of a saved run from the command line, printed as a table or JSON.

Registering the subcommand loads no torch; the ablation modules are imported when the command runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from ..exit_codes import EXIT_BAD_INPUT, EXIT_FINDINGS, EXIT_OK
from ..metric_direction import primary_metric
from ..validate import positive_int
from .errors import AblationError, AblationStopped
from .jobs import Progress, Tracking
from .rates import DEFAULT_SEEDS, REMOVAL_SEEDS, TRAIN_SEEDS, TRAIN_STEPS, parse_rates
from .store import result_path
from .summaries import comparison_summary, knockout_summary, removal_summary, sweep_summary


def add_ablate(sub: argparse._SubParsersAction) -> None:
    """Register the ``ablate`` subcommand."""
    p = sub.add_parser(
        "ablate", help="knock experts out, sweep gate dropout, or retrain with gate dropout (exit 2 on bad input)",
        description="Ablations on a run saved with a checkpoint; results go to RUN/ablations/<kind>.parquet.",
    )
    p.add_argument("run_dir", help="a run directory with checkpoint.pt and model.json")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--knockout", action="store_true", help="knock each expert out of each gate in turn")
    what.add_argument("--dropout-sweep", metavar="RATES", help="evaluate with gate dropout at these rates, e.g. "
                      "0,0.05,0.1,0.2,0.3,0.5")
    what.add_argument("--train-compare", metavar="RATES", help="train short runs with gate dropout at these rates, "
                      "e.g. 0,0.1,0.2, and compare metrics and gate health")
    what.add_argument("--drop-task", nargs="*", metavar="TASK", help="retrain without each named task (each task in "
                      "turn when none is named) and compare the other tasks' metrics with the full model's")
    p.add_argument("--gate", action="append", metavar="NAME", help="knock-out: only the experts of this gate "
                   "(repeat for several; names as in run.json, e.g. a router's module path)")
    ends = p.add_mutually_exclusive_group()
    ends.add_argument("--per-gate", type=int, metavar="N", help="knock-out: only the N most and N least loaded "
                      "experts of each gate (default: every expert when that is at most 256 evaluations, else 2)")
    ends.add_argument("--expert", action="append", type=int, metavar="INDEX", help="knock-out: only the expert "
                      "with this index of each gate (repeat for several)")
    ends.add_argument("--all-experts", action="store_true", help="knock-out: every expert of every gate, however "
                      "many evaluations that takes")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds 0..N-1 (default {len(DEFAULT_SEEDS)} for a sweep, "
                   f"{len(TRAIN_SEEDS)} for training)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"steps per training run (default: the run's own, at most {TRAIN_STEPS})")
    p.add_argument("--factory", metavar="MODULE:FUNCTION", help="build the model with this instead of model.json's")
    p.add_argument("--allow-factory", action="store_true",
                   help="run the factory named in model.json even if it is outside the gatewatch package")
    p.add_argument("--split", choices=["val", "test"], default="val", help="data split to evaluate on")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_ablate)


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-safe rows (NaN and infinities become null)."""
    rows = df.astype(object).where(df.notna(), None).to_dict("records")
    return [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()} for row in rows]


def _cli_bar(desc: str) -> tuple[Progress, Callable[[], None]]:
    """A progress bar on stderr when it is a terminal: the progress callback and the closer."""
    from tqdm.auto import tqdm

    bar = tqdm(total=0, desc=desc, disable=not sys.stderr.isatty(), leave=False)
    said: list[int] = []

    def update(done: int, total: int, message: str) -> None:
        if not said:  # the plan and its estimate, before the first step
            said.append(total)
            left = message.partition("(about ")[2].rstrip(")")
            estimate = f", about {left}" if left else ""
            plural = "s" * (total != 1)
            print(f"gatewatch ablate {desc}: {total} evaluation{plural}{estimate}", file=sys.stderr, flush=True)
        bar.total, bar.n = total, done
        bar.set_postfix_str(message, refresh=True)

    return update, bar.close


def _check_seeds(seeds: int | None) -> None:
    """``--seeds`` is a number of seeds (or not given); AblationError otherwise."""
    if seeds is not None:
        try:
            positive_int("--seeds", seeds, unit="a number of seeds")
        except ValueError as err:
            raise AblationError(str(err)) from None


def cmd_ablate(args: argparse.Namespace) -> int:
    """Run one ablation on a saved run; exit 0 done, 1 stopped, 2 bad input."""
    kind = ("knockout" if args.knockout else "dropout_sweep" if args.dropout_sweep else
            "task_removal" if args.drop_task is not None else "train")
    progress, close = _cli_bar(kind)
    options = [f"{k}={v}" for k, v in vars(args).items() if k not in ("func", "command") and v not in (None, False)]
    tracking = Tracking(track=True, args=options, progress=progress)
    common = {"factory": args.factory, "allow_factory": args.allow_factory, "split": args.split,
              "tracking": tracking}
    try:
        _check_seeds(args.seeds)
        if kind == "knockout":
            from .expert_knockout import run_knockout

            per_gate = None if args.all_experts else args.per_gate if args.per_gate is not None else "auto"
            df = run_knockout(args.run_dir, only=args.gate, per_gate=per_gate, experts=args.expert, **common)
            summary = knockout_summary(df)
        elif kind == "dropout_sweep":
            from .sweep import run_dropout_sweep

            df = run_dropout_sweep(args.run_dir, rates=parse_rates(args.dropout_sweep),
                                   seeds=range(args.seeds or len(DEFAULT_SEEDS)), **common)
            summary = sweep_summary(df)
        elif kind == "task_removal":
            from .task_removal import run_task_removal

            df = run_task_removal(args.run_dir, drop=args.drop_task, seeds=range(args.seeds or len(REMOVAL_SEEDS)),
                                  steps=args.steps, **common)
            summary = removal_summary(df)
        else:
            from .comparison import train_comparison

            df = train_comparison(args.run_dir, rates=parse_rates(args.train_compare),
                                  seeds=range(args.seeds or len(TRAIN_SEEDS)), steps=args.steps, **common)
            summary = comparison_summary(df)
    except AblationError as err:
        hint = " (on the command line: --allow-factory)" if "allow_factory=True" in str(err) else ""
        print(f"gatewatch ablate: {err}{hint}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except AblationStopped as err:
        print(f"gatewatch ablate: {kind} {err}; nothing was written.", file=sys.stderr)
        return EXIT_FINDINGS
    finally:
        close()
    written = result_path(args.run_dir, kind)
    if args.json:
        print(json.dumps({"run": str(args.run_dir), "kind": kind, "split": args.split, "written": str(written),
                          "results": _records(df), "summary": _records(summary)}, indent=2))
    else:
        print(render_summary(kind, df, summary, args.run_dir, written))
    return EXIT_OK


def render_summary(kind: str, df: pd.DataFrame, summary: pd.DataFrame, run_dir: Any, written: Path) -> str:
    """The table printed by ``gatewatch ablate`` without ``--json``."""
    pd_opts = {"float_format": lambda v: f"{v:+.4f}" if v == v else "nan"}
    lines = [f"gatewatch ablate {kind}: {run_dir}", ""]
    if kind == "knockout":
        lines.append("harm of knocking out each expert (metric change, + = worse), per task:")
        for task, rows in df.groupby("task", sort=False):
            metric = primary_metric(rows["metric"])
            sel = rows[rows["metric"] == metric]
            table = sel.pivot_table(index="gate", columns="expert_name", values="harm", sort=False)
            lines += ["", f"task {task} - {metric} (base {sel['base'].iloc[0]:.4f})", table.to_string(**pd_opts)]
        lines += ["", "summary (concentration = worst / total harm; near 1 = one expert carries the task):",
                  summary.to_string(index=False)]
    elif kind == "dropout_sweep":
        metrics = {t: primary_metric(r["metric"]) for t, r in df.groupby("task", sort=False)}
        sel = summary[[metrics[t] == m for t, m in zip(summary["task"], summary["metric"], strict=True)]]
        lines += ["mean over seeds at each gate dropout rate (harm: + = worse than rate 0):",
                  sel.to_string(index=False)]
    elif kind == "task_removal":
        lines += ["each remaining task's metric without the dropped task, against the full model (same seeds and "
                  "steps; spread: standard error over seeds):", *summary["sentence"]]
    else:
        lines += ["metrics and gate health per gate dropout rate (mean over seeds):", summary.to_string(index=False)]
    lines += ["", f"written: {written}"]
    return "\n".join(lines)
