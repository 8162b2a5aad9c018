"""Cost of expert similarity on a census-sized MMoE (input 499, 8 experts 256 -> 128, 2 tasks, batch 1024).

In one process, interleaved in blocks, it times an unmonitored step, the gate-capture watch without
similarity (``similarity_every=0``) and the same watch at the default schedule (``similarity_every=50``,
1,024 rows), and prints the mean ratios (the cost over a run, measured steps and flushes included).
Target: at most 1.01x against the watch without similarity. Then the time of one measurement
(``similarity_matrices`` on eight ``[1024, 128]`` outputs) and its share of a plain step, first.

    python benchmarks/bench_similarity.py [--steps 400] [--threads 2] [--quick]
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
    CENSUS_TASKS,
    census_mmoe,
    interleaved,
    interleaved_flush_secs,
    ratio_report,
    setup,
    time_steps,
)
from _common import training_step as census_step

import gatewatch as gw
from gatewatch.quantities.similarity.maths import similarity_matrices

EVERY = 50


def amortised(steps: int, log_root: Path) -> None:
    """Print the ratio lines."""
    fns, watches = {"plain": census_step(census_mmoe())}, []
    for name, every in (("gates", 0), ("similarity", EVERY)):
        model = census_mmoe()
        watch = gw.GateWatch(model, tasks=list(CENSUS_TASKS), log_dir=log_root / name, tensorboard=False,
                             similarity_every=every, flush_secs=interleaved_flush_secs(3))
        watches.append(watch)
        fns[name] = census_step(model, watch)
    times = interleaved(fns, steps=steps, block=EVERY, warmup=EVERY)
    for watch in watches:
        watch.close()
    print(ratio_report("gate capture, no similarity vs plain", times["plain"], times["gates"]))
    print(ratio_report(f"similarity_every={EVERY} vs plain", times["plain"], times["similarity"]))
    print(ratio_report(f"similarity_every={EVERY} vs gate capture (target 1.01x mean)", times["gates"],
                       times["similarity"]), flush=True)
    ratio = statistics.fmean(times["similarity"]) / statistics.fmean(times["gates"])
    print(f"amortised cost of similarity at every={EVERY}: {ratio:.4f}x mean step time")


def measurement_cost(plain_s: float) -> None:
    g = torch.Generator().manual_seed(0)
    outputs = [torch.relu(torch.randn(CENSUS_BATCH, CENSUS_SIZE["expert_dim"], generator=g))
               for _ in range(CENSUS_SIZE["n_experts"])]
    seconds = statistics.median(time_steps(lambda: similarity_matrices(outputs), 20, warmup=3))
    print(f"one measurement (8 experts, [1024, 128] each): {seconds * 1e3:.2f} ms = {seconds / plain_s:.3f} of a "
          f"plain step; / {EVERY} steps = {seconds / plain_s / EVERY:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="100 steps")
    args = parser.parse_args()
    setup(args.threads)
    plain = statistics.median(time_steps(census_step(census_mmoe()), 10, warmup=3))
    measurement_cost(plain)
    with tempfile.TemporaryDirectory() as root:
        amortised(100 if args.quick else args.steps, Path(root))


if __name__ == "__main__":
    main()
