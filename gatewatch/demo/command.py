"""``gatewatch demo``: open the dashboard, then train a healthy MMoE and one that polarizes side by side, live.

Also ``python -m gatewatch.demo``. The default is the story of :mod:`gatewatch.demo.story` (census-income,
2,000 steps per run, into ``runs/demo-<timestamp>/``, the sample runs copied to ``runs/sample_runs``);
``--quick`` trains 300 steps per run. ``--single`` trains one model of your choice (``--model``, ``--data``,
``--steps``, default an 8-expert MMoE on the MMoE paper's synthetic data for 3,000 steps) into
``runs/demo-<timestamp>`` and prints its report.
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
    from ..training.loop import TrainConfig

DEFAULT_STEPS = 3000
STORY_STEPS, QUICK_STEPS = 2000, 300
DATA_KWARGS = {"synthetic": {"correlation": 0.5, "n_train": 10_000}, "census": {}}
# The models the demo trains: the keys of gatewatch.training.loop.MODELS that have gates and read feature data
# (not the sparse MoE, which reads token ids; a test keeps the two in step). Named here so that building the
# command line does not load torch.
DEMO_MODELS = ("cgc", "mmoe", "omoe", "ple")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (shared by ``gatewatch demo`` and ``python -m gatewatch.demo``)."""
    parser.add_argument("--model", default="mmoe", choices=DEMO_MODELS,
                        help="model to train (default mmoe)")
    parser.add_argument("--data", default="synthetic", choices=sorted(DATA_KWARGS),
                        help="data set: the MMoE paper's synthetic tasks (p=0.5) or UCI census-income (downloaded)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps (default {STORY_STEPS} per run; {DEFAULT_STEPS} with --single)")
    parser.add_argument("--gate-dropout", type=float, default=0.0, metavar="P",
                        help="drop each expert from the gate output with probability P and renormalise (e.g. 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init and batch order")
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default runs/demo-<timestamp>)")
    parser.add_argument("--single", action="store_true",
                        help="train one model (--model, --data, --steps ...) instead of the two-run story")
    parser.add_argument("--quick", action="store_true",
                        help=f"the story with {QUICK_STEPS} steps per run (a short check, e.g. in tests)")
    parser.add_argument("--no-dashboard", action="store_true", help="only train and print the report")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"dashboard port (default {DEFAULT_PORT})")


def demo_config(args: argparse.Namespace) -> TrainConfig:
    """The training configuration of the demo for the parsed options."""
    from ..training.loop import TrainConfig, supports_conflict

    return TrainConfig(
        model=args.model, data=args.data, data_kwargs=dict(DATA_KWARGS[args.data]), steps=args.steps,
        batch_size=256, lr=1e-3, seed=args.seed, gate_dropout=args.gate_dropout, every=10, flush_every=100,
        conflict_every=20 if supports_conflict() else None, eval_every=max(1, args.steps // 10),
    )


def run_story_demo(args: argparse.Namespace) -> int:
    """The two-run story (:mod:`gatewatch.demo.story`); the dashboard keeps serving until Ctrl+C."""
    from .story import run_story

    steps = QUICK_STEPS if args.quick else STORY_STEPS if args.steps is None else args.steps
    try:
        positive_int("--steps", steps)
        outcome = run_story(args.out or Path("runs"), steps=steps, port=args.port, dashboard=not args.no_dashboard)
    except (ValueError, RuntimeError) as err:
        print(f"gatewatch demo: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    server = outcome["server"]
    if server is None:
        return EXIT_OK
    print(f"the dashboard keeps serving at {outcome['link']}; stop it with Ctrl+C")
    try:
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        return EXIT_OK


def run_demo(args: argparse.Namespace) -> int:
    """The story, or with --single: train, print the report, then open the dashboard unless --no-dashboard."""
    if not args.single:
        return run_story_demo(args)
    args.steps = DEFAULT_STEPS if args.steps is None else args.steps
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
    from ..run_reader import load_run
    from ..training.loop import train

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
    p = sub.add_parser("demo", help="open the dashboard and train a healthy and a polarizing MMoE side by side")
    add_arguments(p)
    p.set_defaults(func=run_demo)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gatewatch.demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_demo(parser.parse_args(argv))
