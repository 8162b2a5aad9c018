"""Overhead of gate capture on a census-sized MMoE training step (input 499, 8 experts, 2 or 4 tasks, batch 1024).

First, the primary figure: what the training thread spends per flush, timed around each flush of a real training
loop (``flush_every=100``), with the writes on the writer thread (the default) and on the training thread
(``write_in_background=False``, how every write ran before), at ``every=1`` and with the default watch.
Target: at most a tenth of the latter. The writer thread's own time per flush is printed beside it.

Then the wall-clock ratios: an unmonitored step, a second unmonitored model (the A/A pair: what two identical
sides differ by on this machine) and monitored steps run in one process, interleaved in blocks whose order rotates
every round; each watch flushes as it would alone (every 100 steps or 5 s of its own share of the wall clock,
:func:`_common.interleaved_flush_secs`):

* the default watch (``every=10``, expert similarity every 50 steps, TensorBoard);
* statistics every step (``every=1``);
* gradient conflict every 50 steps (``conflict_every=50``);
* the conflict proxy every step (``conflict_proxy=True``);
* with ``--durable``, the default watch with ``durable=True`` (fsync of every file of the run directory).

Each line gives the median and the mean step time and their ratios to the plain step; then, paired by round, the
median of the per-block median ratios and the ratio of the total times (the mean ratio: what the wall clock
sees, flushes included), each with its 95% interval. Targets: mean <= 1.015x for the default watch, <= 1.02x for
the others. Then the time spent inside gatewatch's own calls of an every=1 loop, and the cost of the window sums
and of the finding rules (``--profile`` adds an operator table of one flush on the training thread).

    python benchmarks/bench_capture.py [--tasks 2|4] [--steps 2000] [--block 10] [--threads 2] [--flushes 10]
                                       [--durable] [--quick] [--profile]
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
    census_mmoe,
    census_tasks,
    interleaved,
    interleaved_flush_secs,
    paired_mean_ratio,
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
    "default watch (every=10, similarity 50, TB)": {},
    "every=1": {"every": 1},
    "conflict every 50": {"conflict_every": 50},
    "proxy every step": {"conflict_proxy": True},
}
DURABLE = {"default watch, durable=True": {"durable": True}}


def flush_cost(tasks: int, flushes: int, log_root: Path, profile: bool) -> None:
    """Print the training thread's time per flush (timed around each flush of a training loop that flushes every
    100 steps), with the writes in the background and on the training thread, and the writer thread's own time."""
    print(f"\ntraining thread's time per flush ({flushes} flushes of 100 steps each, {tasks} tasks; median / mean / "
          "max ms):")
    for label, kwargs in (("every=1", {"every": 1}), ("default watch", {})):
        today = None
        for background in (False, True):
            model = census_mmoe(tasks=tasks)
            watch = gw.GateWatch(model, tasks=census_tasks(tasks), log_dir=log_root / f"flush-{label}-{background}",
                                 flush_every=100, flush_secs=None, write_in_background=background, **kwargs)
            spent: list[float] = []

            def timed_flush(flush=watch.flush, spent=spent) -> None:
                start = time.perf_counter()
                flush()
                spent.append(time.perf_counter() - start)

            watch.flush = timed_flush  # step() calls it
            step = training_step(model, watch)
            for _ in range(100 * flushes + 10):
                step()
            if profile and background:
                with torch.profiler.profile() as prof:
                    for _ in range(100):
                        step()
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
            watch.close()
            spent = spent[1:] or spent  # the first flush also imports and opens files
            median, mean = statistics.median(spent) * 1e3, statistics.fmean(spent) * 1e3
            where = "writer thread" if background else "training thread (today)"
            line = (f"  {label:<14} writes on the {where:<24} {median:8.2f} / {mean:8.2f} / {max(spent) * 1e3:8.2f}"
                    f"   waits {watch.writes.waits}")
            if background and today:
                line += f"   {mean / today:6.1%} of today's mean (target <= 10%)"
                per_flush, cpu = (busy / watch.writes.flushes * 1e3 for busy in (watch.writes.busy_s,
                                                                                 watch.writes.busy_cpu_s))
                line += f"; the writer thread's time per flush {per_flush:.1f} ms ({cpu:.1f} ms of CPU)"
            today = today or mean
            print(line, flush=True)


def overhead(tasks: int, steps: int, block: int, warmup: int, log_root: Path, durable: bool) -> float:
    """Print one ratio line per configuration and the A/A line; return the median plain step time (s)."""
    configs = {**CONFIGS, **(DURABLE if durable else {})}
    fns = {"plain": training_step(census_mmoe(tasks=tasks)), "A/A": training_step(census_mmoe(tasks=tasks))}
    watches = {}
    for i, (name, kwargs) in enumerate(configs.items()):
        model = census_mmoe(tasks=tasks)
        watches[name] = gw.GateWatch(model, tasks=census_tasks(tasks), log_dir=log_root / f"side{i}",
                                     flush_secs=interleaved_flush_secs(2 + len(configs)), **kwargs)
        fns[name] = training_step(model, watches[name])
    times = interleaved(fns, steps=steps, block=block, warmup=warmup)
    for watch in watches.values():
        watch.close()
    plain = times["plain"]
    aa = statistics.median(times["A/A"]) / statistics.median(plain)
    print(ratio_report("A/A (a second unmonitored model)", plain, times["A/A"]), flush=True)
    for name in configs:
        ratio = statistics.median(times[name]) / statistics.median(plain)
        print(f"{ratio_report(name, plain, times[name])}   / A/A {ratio / aa:6.3f}", flush=True)
    print(f"paired by round ({len(plain) // block} rounds of blocks of {block}; 95% intervals): median of the "
          "per-block median ratios; ratio of the total times (the mean ratio); waits for the writer")
    for name in ["A/A", *configs]:
        med, mean = paired_ratio(plain, times[name], block), paired_mean_ratio(plain, times[name], block)
        waits = "" if name == "A/A" else (f"   waits {watches[name].writes.waits} "
                                          f"({watches[name].writes.waited_s * 1e3:.0f} ms)")
        print(f"  {name:<44} median {med[0]:6.3f}x [{med[1]:.3f}, {med[2]:.3f}]   mean {mean[0]:6.3f}x "
              f"[{mean[1]:.3f}, {mean[2]:.3f}]{waits}", flush=True)
    return statistics.median(plain)


def own_time(plain_step_s: float, steps: int, log_root: Path) -> None:
    """Print the time spent inside gatewatch's own calls of an every=1 run (gate hooks, recording the losses,
    ``step()``, which flushes every 100 steps), timed around each call in the training loop: the part of the
    capture cost that the interleaved ratios cannot resolve below the machine's step-to-step noise."""
    model = census_mmoe()
    watch = gw.GateWatch(model, tasks=census_tasks(), log_dir=log_root / "own_time", every=1, flush_every=100,
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


def op_costs(plain_step_s: float, log_root: Path, n: int) -> None:
    """Cost of the per-step window sums on the census shapes (2 gates of [1024, 8]), and of the finding rules over
    the 100 recent windows (run on the writer thread, at most 1 / FINDINGS_COST_RATIO of the time)."""
    e = CENSUS_SIZE["n_experts"]
    p = torch.softmax(torch.randn(2, CENSUS_BATCH, e), -1)
    print(f"\nop-level costs (median; plain step {plain_step_s * 1e3:.2f} ms):")
    us = micro(lambda: window_sums(p, threshold=0.9, bins=20), n)
    print(f"  {'window_sums, 2 gates [1024, 8], per step':<52} {us:9.1f} us  {us / 1e6 / plain_step_s:7.2%} of a step")
    model = census_mmoe()
    watch = gw.GateWatch(model, tasks=census_tasks(), every=1, flush_every=100, flush_secs=None,
                         log_dir=log_root / "findings")
    step = training_step(model, watch)
    for _ in range(100):
        step()
    watch.writes.drain()
    recent = watch._fanout.recent
    us = micro(lambda: recent.findings(watch.log_dir, watch.meta, force=True), max(5, n // 50))
    watch.close()
    print(f"  {'finding rules on the 100 recent windows, one run':<52} {us / 1e3:9.2f} ms  "
          f"{us / 1e6 / (plain_step_s * 100):7.2%} of 100 steps; run at most every {FINDINGS_COST_RATIO} x their "
          f"cost ({FINDINGS_COST_RATIO * us / 1e6:.1f} s): <= {1 / FINDINGS_COST_RATIO:.0%} of the time")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2, choices=(2, 3, 4), help="tasks of the census model")
    parser.add_argument("--steps", type=int, default=2000, help="timed steps per side and configuration")
    parser.add_argument("--block", type=int, default=10, help="steps per interleaved block")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per side before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--flushes", type=int, default=10, help="flushes timed per watch for the time per flush")
    parser.add_argument("--durable", action="store_true", help="also the default watch with durable=True")
    parser.add_argument("--only", choices=("flush", "ratios"), help="only the time per flush, or only the ratios")
    parser.add_argument("--quick", action="store_true", help="200 steps per configuration, 2 flushes (a smoke run)")
    parser.add_argument("--profile", action="store_true", help="also print the operator table of 100 steps")
    args = parser.parse_args(argv)
    steps, flushes = (200, 2) if args.quick else (args.steps, args.flushes)
    setup(args.threads)
    print(f"gate capture overhead: census-sized MMoE, {args.tasks} tasks, batch {CENSUS_BATCH}, {args.threads} "
          f"threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "ratios":
            flush_cost(args.tasks, flushes, Path(tmp), args.profile)
        if args.only == "flush":
            return
        print(f"\nwall clock: {steps} steps per side, blocks of {args.block}")
        plain_step = overhead(args.tasks, steps, args.block, args.warmup, Path(tmp), args.durable)
        own_time(plain_step, 200 if args.quick else 1000, Path(tmp))
        op_costs(plain_step, Path(tmp), 200 if args.quick else 1000)


if __name__ == "__main__":
    main()
