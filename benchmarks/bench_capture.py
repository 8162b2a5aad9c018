"""Overhead of gate capture on a census-sized MMoE training step (input 499, 8 experts, 2 tasks, batch 1024).

Runs plain and monitored training steps in one process, interleaved in blocks, and prints their
median and mean step times and ratios for:

* statistics every step, a window every 10 steps, a flush every 100 steps (the defaults);
* the same with one window per flush (``every=100``);
* the defaults with TensorBoard events written at each flush.

Then the cost of each piece of the capture path on fixed tensors (``--profile`` adds an operator
table). Target: at most 1.03x (mean, flushes included).

    python benchmarks/bench_capture.py [--steps 1000] [--block 50] [--threads 2] [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    CENSUS_BATCH,
    CENSUS_SIZE,
    census_mmoe,
    interleaved,
    ratio_report,
    setup,
    time_steps,
    training_step,
)

import gatewatch as gw
from gatewatch.accumulators import GateAccumulator
from gatewatch.functional import window_sums

CONFIGS = {
    "every=10 flush_every=100": {"every": 10, "flush_every": 100, "tensorboard": False},
    "every=100 flush_every=100": {"every": 100, "flush_every": 100, "tensorboard": False},
    "every=10 flush_every=100 +TensorBoard": {"every": 10, "flush_every": 100, "tensorboard": True},
}


def overhead(steps: int, block: int, warmup: int, log_root: Path) -> float:
    """Print one ratio line per configuration; return the median plain step time (s)."""
    plain_times: list[float] = []
    for name, kwargs in CONFIGS.items():
        plain_model, watched_model = census_mmoe(), census_mmoe()
        watch = gw.GateWatch(watched_model, tasks=["income", "marital"], log_dir=log_root / name.replace(" ", "_"),
                             **kwargs)
        times = interleaved({"plain": training_step(plain_model), "monitored": training_step(watched_model, watch)},
                            steps=steps, block=block, warmup=warmup)
        watch.close()
        plain_times += times["plain"]
        print(ratio_report(name, times["plain"], times["monitored"]), flush=True)
    return statistics.median(plain_times)


def micro(fn, n: int) -> float:
    """Median microseconds of ``fn`` over ``n`` calls (after 20 warm-up calls)."""
    return statistics.median(time_steps(fn, n, warmup=20)) * 1e6


def op_costs(plain_step_s: float, log_root: Path, n: int, profile: bool) -> None:
    """Cost of each piece of the capture path, on the census shapes (2 gates of [1024, 8])."""
    e = CENSUS_SIZE["n_experts"]
    p = torch.softmax(torch.randn(2, CENSUS_BATCH, e), -1)
    acc = GateAccumulator([None, None], threshold=0.9, bins=20, margin=0.05)
    model = census_mmoe()
    watch = gw.GateWatch(model, tasks=["income", "marital"], log_dir=log_root / "ops", tensorboard=False, every=10)
    tb_watch = gw.GateWatch(census_mmoe(), tasks=["income", "marital"], log_dir=log_root / "ops_tb", every=10)

    def fold() -> None:  # a window of 10 steps: each step holds its two gate outputs, the window folds once
        for _ in range(10):
            watch._pending = [(0, p[0]), (1, p[1])]
            watch._hold()
        watch._fold()

    def close_window() -> None:  # one window closed (its flush is timed separately)
        watch._close_window()
        watch._windows.clear()

    def flush(w: gw.GateWatch) -> None:  # 10 windows of 2 gates, then one flush
        for _ in range(10):
            w._pending = [(0, p[0]), (1, p[1])]
            w._fold()
            w.step_count += 10
            w._close_window()
        w.flush()

    rows = [
        ("window_sums, 2 gates [1024, 8]", micro(lambda: window_sums(p, threshold=0.9, bins=20), n)),
        ("GateAccumulator.add (sums + state update)", micro(lambda: acc.add([0, 1], p, 1), n)),
        ("watch hold + one fold per 10 steps, per step", micro(fold, n) / 10),
        ("watch._close_window (device copy), per window", micro(close_window, n)),
    ]
    flush_us = micro(lambda: flush(watch), max(5, n // 100))
    flush_tb_us = micro(lambda: flush(tb_watch), max(5, n // 100))
    print(f"\nop-level costs (median; plain step {plain_step_s * 1e3:.2f} ms):")
    for label, us in rows:
        print(f"  {label:<48} {us:9.1f} us  {us / 1e6 / plain_step_s:7.2%} of a step")
    for label, us in (("flush of 10 windows, Parquet", flush_us), ("flush of 10 windows, Parquet + TensorBoard",
                                                                    flush_tb_us)):
        print(f"  {label:<48} {us / 1e3:9.2f} ms  {us / 1e6 / plain_step_s / 100:7.2%} of a step (every 100)")
    if profile:
        with torch.profiler.profile() as prof:
            for _ in range(200):
                fold()
        print("\noperators of watch._fold, 200 calls:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    watch.close()
    tb_watch.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="timed steps per side and configuration")
    parser.add_argument("--block", type=int, default=10, help="steps per interleaved block")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per side before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="200 steps per configuration (a smoke run)")
    parser.add_argument("--profile", action="store_true", help="also print the operator table of the capture path")
    args = parser.parse_args(argv)
    steps = 200 if args.quick else args.steps
    setup(args.threads)
    print(f"gate capture overhead: census-sized MMoE, batch {CENSUS_BATCH}, {args.threads} threads, "
          f"{steps} steps per side, blocks of {args.block}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        plain_step = overhead(steps, args.block, args.warmup, Path(tmp))
        op_costs(plain_step, Path(tmp), 200 if args.quick else 1000, args.profile)


if __name__ == "__main__":
    main()
