"""Overhead of gate capture on a census-sized MMoE training step (input 499, 8 experts, 2 tasks, batch 1024).

Runs an unmonitored step, a second unmonitored model (the A/A pair: what two identical sides differ by on
this machine) and monitored steps in one process, interleaved in blocks, and prints their median and
mean step times and ratios against the unmonitored step:

* statistics every step (``every=1``), a flush every 100 steps or 5 s of its own share of the wall clock
  (:func:`_common.interleaved_flush_secs`), TensorBoard on;
* a window every 10 steps (``every=10``), the same flushes;
* ``every=10`` with ``durable=True`` (fsync of every file of the run directory).

Target: every=1 at most 1.01 x the A/A ratio of the same run (median). The paired lines compare each side with
plain and with A/A block by block within each round, with a 95% interval. Then the time spent inside gatewatch's
own calls of an every=1 training loop (a floor the ratios cannot resolve below the machine's noise), and the
cost of each piece of the capture path on fixed tensors (``--profile`` adds an operator table of the flush).

    python benchmarks/bench_capture.py [--steps 1000] [--block 10] [--threads 2] [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    CENSUS_BATCH,
    CENSUS_SIZE,
    CENSUS_TASKS,
    census_mmoe,
    interleaved,
    interleaved_flush_secs,
    paired_ratio,
    ratio_report,
    setup,
    time_steps,
    training_step,
)

import gatewatch as gw
from gatewatch.maths.gate_sums import window_sums
from gatewatch.sinks.live_findings import FINDINGS_COST_RATIO

CONFIGS = {
    "every=1 flush_every=100 +TensorBoard": {"every": 1, "flush_every": 100},
    "every=10 flush_every=100 +TensorBoard": {"every": 10, "flush_every": 100},
    "every=10 +TensorBoard durable=True": {"every": 10, "flush_every": 100, "durable": True},
}


def overhead(steps: int, block: int, warmup: int, log_root: Path) -> float:
    """Print one ratio line per configuration and the A/A line; return the median plain step time (s)."""
    fns = {"plain": training_step(census_mmoe()), "A/A": training_step(census_mmoe())}
    watches = {}
    for name, kwargs in CONFIGS.items():
        model = census_mmoe()
        watches[name] = gw.GateWatch(model, tasks=list(CENSUS_TASKS), log_dir=log_root / name.replace(" ", "_"),
                                     flush_secs=interleaved_flush_secs(2 + len(CONFIGS)), **kwargs)
        fns[name] = training_step(model, watches[name])
    times = interleaved(fns, steps=steps, block=block, warmup=warmup)
    for watch in watches.values():
        watch.close()
    plain = times["plain"]
    aa = statistics.median(times["A/A"]) / statistics.median(plain)
    print(ratio_report("A/A (a second unmonitored model)", plain, times["A/A"]), flush=True)
    for name in CONFIGS:
        ratio = statistics.median(times[name]) / statistics.median(plain)
        print(f"{ratio_report(name, plain, times[name])}   / A/A {ratio / aa:6.3f}", flush=True)
    print(f"paired by round (median of per-block ratios, 95% interval), blocks of {block}:")
    for name in ["A/A", *CONFIGS]:
        vs_plain = paired_ratio(plain, times[name], block)
        vs_aa = paired_ratio(times["A/A"], times[name], block)
        print(f"  {name:<38} vs plain {vs_plain[0]:6.3f}x [{vs_plain[1]:.3f}, {vs_plain[2]:.3f}]"
              + ("" if name == "A/A" else f"   vs A/A {vs_aa[0]:6.3f}x [{vs_aa[1]:.3f}, {vs_aa[2]:.3f}]"), flush=True)
    return statistics.median(plain)


def own_time(plain_step_s: float, steps: int, log_root: Path) -> None:
    """Print the time spent inside gatewatch's own calls of an every=1 run (gate hooks, recording the losses,
    ``step()``, which flushes every 100 steps), timed around each call in the training loop: the part of the
    capture cost that the interleaved ratios cannot resolve below the machine's step-to-step noise."""
    model = census_mmoe()
    watch = gw.GateWatch(model, tasks=list(CENSUS_TASKS), log_dir=log_root / "own_time", every=1, flush_every=100,
                         flush_secs=None)
    spent = [0.0]

    def timed(fn):
        def call(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent[0] += time.perf_counter() - start
        return call

    for gate in watch.gates:  # the watch's forward hook on each gate module (shared by its quantities)
        hooks = gate.module._forward_hooks
        for key in list(hooks):
            hooks[key] = timed(hooks[key])
    watch._record = timed(watch._record)  # the losses handed to every quantity
    watch.step = timed(watch.step)
    step = training_step(model, watch)
    per_step, flush_steps = [], []
    for i in range(steps + 10):
        spent[0] = 0.0
        step()
        if i >= 10:
            (flush_steps if watch.step_count % 100 == 0 else per_step).append(spent[0])
    watch.close()
    typical, mean = statistics.median(per_step), (sum(per_step) + sum(flush_steps)) / steps
    print(f"\ngatewatch's own calls, every=1 +TensorBoard, {steps} steps (plain step {plain_step_s * 1e3:.2f} ms):")
    print(f"  {'a step without a flush (hooks, losses, step()), median':<58} {typical * 1e6:8.1f} us  "
          f"{typical / plain_step_s:7.3%} of a step")
    print(f"  {'a step with the flushes every 100 steps, mean':<58} {mean * 1e6:8.1f} us  "
          f"{mean / plain_step_s:7.3%} of a step")


def micro(fn, n: int) -> float:
    """Median microseconds of ``fn`` over ``n`` calls (after 5 warm-up calls)."""
    return statistics.median(time_steps(fn, n, warmup=5)) * 1e6


def op_costs(plain_step_s: float, log_root: Path, n: int, profile: bool) -> None:
    """Cost of each piece of the capture path, on the census shapes (2 gates of [1024, 8]), 100 steps a flush."""
    e = CENSUS_SIZE["n_experts"]
    p = torch.softmax(torch.randn(2, CENSUS_BATCH, e), -1)
    counter = [0]

    def flush_of(every: int, tensorboard: bool):
        watch = gw.GateWatch(census_mmoe(), tasks=list(CENSUS_TASKS), tensorboard=tensorboard, every=every,
                             flush_every=10**9, flush_secs=None, log_dir=log_root / f"ops{counter[0]}")
        counter[0] += 1
        stats = next(q for q in watch.quantities if q.name == "gates")

        def run() -> None:  # 100 steps of held outputs, then one flush: stacked fold, rows, sinks
            for _ in range(100):
                stats._pending = [(0, p[0]), (1, p[1])]
                watch.step()
            watch.flush()

        return watch, run

    print(f"\nop-level costs (median; plain step {plain_step_s * 1e3:.2f} ms):")
    us = micro(lambda: window_sums(p, threshold=0.9, bins=20), n)
    print(f"  {'window_sums, 2 gates [1024, 8], per step':<52} {us:9.1f} us  {us / 1e6 / plain_step_s:7.2%} of a step")
    for every, tb in ((1, False), (1, True), (10, True)):
        watch, run = flush_of(every, tb)
        us = micro(run, max(5, n // 50))
        label = f"100 steps + flush, every={every}{' +TensorBoard' if tb else ''}"
        print(f"  {label:<52} {us / 1e3:9.2f} ms  {us / 1e6 / plain_step_s / 100:7.2%} of a step")
        if every == 1 and not tb:  # the finding rules over the recent windows (the run summary's findings)
            recent = watch._recent
            us = micro(lambda r=recent, w=watch: r.findings(w.log_dir, w.meta, force=True), max(5, n // 50))
            flush_s = plain_step_s * 100
            print(f"  {'finding rules on the 100 recent windows, one run':<52} {us / 1e3:9.2f} ms  "
                  f"{us / 1e6 / flush_s:7.2%} of 100 steps; run at most every {FINDINGS_COST_RATIO} x their "
                  f"cost ({FINDINGS_COST_RATIO * us / 1e6:.1f} s): <= {1 / FINDINGS_COST_RATIO:.0%} of the time")
        if profile and every == 1 and tb:
            with torch.profiler.profile() as prof:
                run()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        watch.close()


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
        own_time(plain_step, 200 if args.quick else 1000, Path(tmp))
        op_costs(plain_step, Path(tmp), 200 if args.quick else 1000, args.profile)


if __name__ == "__main__":
    main()
