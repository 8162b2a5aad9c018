"""``gatewatch demo``: train a small model with GateWatch attached, print its report, open the dashboard.

Also ``python -m gatewatch.training``. The default trains an 8-expert MMoE on the MMoE paper's
synthetic data (task correlation 0.5) for 3,000 steps, about a minute on 2 CPU cores, into
``runs/demo-<timestamp>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..app.launch import DEFAULT_PORT
from ..exit_codes import EXIT_BAD_INPUT, EXIT_OK
from ..validate import positive_int

if TYPE_CHECKING:
    from .loop import TrainConfig

DEFAULT_STEPS = 3000
DATA_KWARGS = {"synthetic": {"correlation": 0.5, "n_train": 10_000}, "census": {}}
# The models the demo trains: the keys of gatewatch.training.loop.MODELS that have gates (a test keeps the two
# in step). Named here so that building the command line does not load torch.
DEMO_MODELS = ("cgc", "mmoe", "omoe", "ple")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (shared by ``gatewatch demo`` and ``python -m gatewatch.training``)."""
    parser.add_argument("--model", default="mmoe", choices=DEMO_MODELS,
                        help="model to train (default mmoe)")
    parser.add_argument("--data", default="synthetic", choices=sorted(DATA_KWARGS),
                        help="data set: the MMoE paper's synthetic tasks (p=0.5) or UCI census-income (downloaded)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})")
    parser.add_argument("--gate-dropout", type=float, default=0.0, metavar="P",
                        help="drop each expert from the gate output with probability P and renormalise (e.g. 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init and batch order")
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default runs/demo-<timestamp>)")
    parser.add_argument("--no-dashboard", action="store_true", help="only train and print the report")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"dashboard port (default {DEFAULT_PORT})")


def demo_config(args: argparse.Namespace) -> TrainConfig:
    """The training configuration of the demo for the parsed options."""
    from .loop import TrainConfig, supports_conflict

    return TrainConfig(
        model=args.model, data=args.data, data_kwargs=dict(DATA_KWARGS[args.data]), steps=args.steps,
        batch_size=256, lr=1e-3, seed=args.seed, gate_dropout=args.gate_dropout, every=10, flush_every=100,
        conflict_every=20 if supports_conflict() else None, eval_every=max(1, args.steps // 10),
    )


def run_demo(args: argparse.Namespace) -> int:
    """Train, print the report, then open the dashboard on the run's folder unless --no-dashboard."""
    out = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    try:
        positive_int("--steps", args.steps)
        config = demo_config(args)
    except ValueError as err:
        print(f"gatewatch demo: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    import torch

    from ..app.launch import serve
    from ..report import build_report, render_text
    from ..runs import load_run
    from .loop import train

    # The demo's model is small: one thread is as fast as several on an idle machine, and far faster on a busy
    # one (OpenMP threads that wait for each other: 100 steps took 70 s with 2 threads vs 2 s with 1 on a loaded
    # 2-core machine).
    torch.set_num_threads(1)
    print(f"training {config.model} on {config.data} for {config.steps} steps into {out}")
    result = train(config, out)
    for task, values in result.metrics["test"].items():
        print(f"test {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    print()
    print(render_text(build_report(load_run(out))))
    if args.no_dashboard:
        return EXIT_OK
    print(f"\nopening the dashboard on {out.parent} (port {args.port}); stop it with Ctrl+C")
    return serve(out.parent, port=args.port)


def add_demo(sub: argparse._SubParsersAction) -> None:
    """Register ``gatewatch demo`` (nothing heavy is imported until it runs)."""
    p = sub.add_parser("demo", help="train a small MMoE with gatewatch attached and open the dashboard on it")
    add_arguments(p)
    p.set_defaults(func=run_demo)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gatewatch.training", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_demo(parser.parse_args(argv))
