"""The ``gatewatch`` command: ``report``, ``summarize`` (and the other subcommands registered in COMMANDS).

Each subcommand is registered by a function of a light module: building the parser, ``gatewatch report`` and
``gatewatch summarize`` load no torch; ``demo`` and ``ablate`` import the training and ablation code when they run.
No subcommand module imports this one (the exit statuses live in :mod:`gatewatch.exit_codes`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from .ablation.command import add_ablate
from .app.launch import add_dashboard
from .demo.command import add_demo
from .exit_codes import EXIT_BAD_INPUT, EXIT_FINDINGS, EXIT_OK
from .findings import Thresholds
from .report import build_report, no_data_reason, render_text
from .run_reader import RunReadError, list_runs, load_run
from .summary_cache import cache_dir, summarize

__all__ = ["COMMANDS", "EXIT_BAD_INPUT", "EXIT_FINDINGS", "EXIT_OK", "build_parser", "main"]


def _thresholds(pairs: Sequence[str]) -> Thresholds:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--threshold takes NAME=VALUE, got {pair!r}.")
        values[key.strip()] = float(value)
    return Thresholds.from_dict(values)


def write_stdout(text: str) -> None:
    """Print ``text``; a reader that closed the pipe early (``gatewatch report RUN | head``) ends the output quietly.

    The exit status stays the command's own: the report was made, only its reader left."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python flushes stdout again at exit and would report the closed pipe there: point it at /dev/null
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def cmd_report(args: argparse.Namespace) -> int:
    """Print the health of a run; exit 0 healthy, 1 an error-level finding, 2 unreadable or no data yet."""
    try:
        thresholds = _thresholds(args.threshold)
        run = load_run(args.run_dir)
    except (RunReadError, ValueError) as err:
        print(f"gatewatch report: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    report = build_report(run, thresholds)
    write_stdout(json.dumps(report, indent=2) if args.json else render_text(report))
    if why := no_data_reason(report):
        print(f"gatewatch report: {args.run_dir}: {why}.", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_FINDINGS if any(f["severity"] == "error" for f in report["findings"]) else EXIT_OK


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="print the health of a run (exit 1 on an error finding, 2 when the run is "
                                      "unreadable or has no window yet)")
    p.add_argument("run_dir", help="a run directory written by GateWatch(log_dir=...)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                   help=f"change a finding threshold (repeatable); names: {', '.join(Thresholds().to_dict())}")
    p.set_defaults(func=cmd_report)


def cmd_summarize(args: argparse.Namespace) -> int:
    """Give every run below a folder its summary; exit 0 when every run has one kept, 2 when one could not."""
    from tqdm import tqdm

    root = Path(args.runs_dir)
    if not root.is_dir():
        print(f"gatewatch summarize: {root} is not a folder. Pass the folder of your runs.", file=sys.stderr)
        return EXIT_BAD_INPUT
    paths = list_runs(root)
    if not paths:
        print(f"gatewatch summarize: no gatewatch run at or below {root} (a run is a folder with run.json or "
              "tables/). Pass the folder given to GateWatch(log_dir=...), or its parent.", file=sys.stderr)
        return EXIT_BAD_INPUT
    counts: Counter[str] = Counter()
    failed = []
    for path in tqdm(paths, desc="summarizing", unit="run", file=sys.stderr, disable=args.quiet):
        try:
            done = summarize(path, into_run=not args.cache)
        except RunReadError as err:
            failed.append(f"{path}: {err}")
            continue
        except Exception as err:  # a run that cannot be read: named, and the others go on
            failed.append(f"{path}: could not be read ({type(err).__name__}: {err})")
            continue
        if done.why:
            failed.append(f"{path}: {done.why}")
        counts[done.outcome] += 1
    print(f"{len(paths)} run(s) at or below {root}:\n"
          f"  written into the run:  {counts['written']}\n"
          f"  cached in {cache_dir()} (live, read-only or committed runs, or --cache):  {counts['cached']}\n"
          f"  already had one (summary.json, or an up-to-date cache entry):  {counts['had one']}\n"
          f"  failed:  {len(failed)}")
    for line in failed:
        print(f"    {line}")
    return EXIT_BAD_INPUT if failed else EXIT_OK


def add_summarize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summarize", help="give every run without summary.json (written before summaries) its "
                                         "summary, so the dashboard's Runs page lists it at once")
    p.add_argument("runs_dir", help="a folder of runs (searched recursively), or one run directory")
    p.add_argument("--cache", action="store_true",
                   help="leave the runs untouched: keep every summary in the per-user cache ($GATEWATCH_SUMMARIES, "
                        "else summaries/ in $GATEWATCH_CACHE or ~/.cache/gatewatch)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_summarize)


# Each entry adds one subcommand to the parser; its handler returns the exit status.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_report, add_summarize, add_demo, add_ablate,
                                                                 add_dashboard]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatewatch", description="See what the gates of MoE models are doing.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
