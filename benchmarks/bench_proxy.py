"""Cost of the conflict proxy (``GateWatch(conflict_proxy=True)``) on a census-sized MMoE (input 499, 8 experts
256 -> 128, batch 1024), every step.

Plain steps, steps under the default watch (gate statistics only) and steps under the watch with the proxy
run interleaved in blocks in one process; the ratios against the plain step are printed (median: a typical
step; mean: flushes included), then paired by round with a 95% interval. Target: the proxy watch at most
1.02x the plain step.

    python benchmarks/bench_proxy.py [--steps 300] [--block 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    CENSUS_TASKS,
    census_mmoe,
    interleaved,
    interleaved_flush_secs,
    paired_ratio,
    ratio_report,
    setup,
    training_step,
)

import gatewatch as gw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--block", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    setup(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        models = {name: census_mmoe() for name in ("plain", "gates", "proxy")}
        flush_secs = interleaved_flush_secs(len(models))  # a flush every 100 steps or 5 s of its share of the clock
        watches = {
            "gates": gw.GateWatch(models["gates"], tasks=list(CENSUS_TASKS), log_dir=Path(tmp) / "gates",
                                  tensorboard=False, flush_secs=flush_secs),
            "proxy": gw.GateWatch(models["proxy"], tasks=list(CENSUS_TASKS), log_dir=Path(tmp) / "proxy",
                                  tensorboard=False, conflict_proxy=True, flush_secs=flush_secs),
        }
        fns = {name: training_step(model, watches.get(name)) for name, model in models.items()}
        times = interleaved(fns, args.steps, args.block)
        for watch in watches.values():
            watch.close()
    print(f"census-sized MMoE, {args.steps} steps each, {args.threads} threads, interleaved blocks of {args.block}")
    print(ratio_report("default watch (gate statistics)", times["plain"], times["gates"]))
    print(ratio_report("watch + conflict_proxy (every step)", times["plain"], times["proxy"]))
    print(ratio_report("proxy against the default watch", times["gates"], times["proxy"]))
    print(f"paired by round (median of per-block ratios, 95% interval), blocks of {args.block}:")
    for label, base, side in (("default watch vs plain", "plain", "gates"), ("proxy watch vs plain", "plain", "proxy"),
                              ("proxy watch vs default watch", "gates", "proxy")):
        ratio, low, high = paired_ratio(times[base], times[side], args.block)
        print(f"  {label:<36} {ratio:6.3f}x [{low:.3f}, {high:.3f}]")


if __name__ == "__main__":
    main()
