"""Cost of expert similarity on a census-sized MMoE (input 499, 8 experts 256 -> 128, 2 tasks, batch 1024).

In one process, interleaved in blocks, it times an unmonitored step, the gate-capture watch without
similarity (``similarity_every=0``) and the same watch at the default schedule (``similarity_every=50``,
1,024 rows), and prints the mean ratios (the cost over a run, measured steps and flushes included).
Target: at most 1.01x against the watch without similarity. Then the time of one measurement
(``similarity_matrices`` on eight ``[1024, 128]`` outputs) and its share of a plain step, first.

    python benchmarks/bench_similarity.py [--steps 400] [--threads 2] [--quick]

``--fused`` measures similarity on fused experts instead: a tiny-width transformers Qwen3-MoE (hidden 32, expert
width 16) with 48 layers x 128 experts (top 8), one batch of 1,024 tokens. It prints the time of a measured step
against an unmeasured one (the measurement: each layer's experts called on the probe rows with the routing forced,
then CKA over 8,128 pairs), and the rows written per measurement, full and bounded.

    python benchmarks/bench_similarity.py --fused [--layers 48] [--experts 128] [--threads 2]
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


def fused_cost(layers: int, experts: int, log_root: Path, repeats: int = 3) -> None:
    """Print a measured step's extra time and the rows written per measurement on fused experts."""
    import transformers as tf

    config = tf.Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                               num_experts=experts, num_experts_per_tok=8, norm_topk_prob=True,
                               max_position_embeddings=128)
    torch.manual_seed(0)
    model = tf.AutoModel.from_config(config)
    for name, p in model.named_parameters():
        if name.endswith("gate.weight"):
            torch.nn.init.normal_(p, 0, 0.3)
    ids = torch.randint(0, 128, (8, 128), generator=torch.Generator().manual_seed(0))
    watch = gw.GateWatch(model, log_dir=log_root / "fused", tensorboard=False, similarity_every=2,
                         flush_every=10_000)
    step_s: dict[bool, list[float]] = {True: [], False: []}
    for step in range(1, 2 * repeats + 3):
        started = time.perf_counter()
        model(input_ids=ids).last_hidden_state.square().mean().backward()
        model.zero_grad()
        watch.step()
        if step > 2:  # step 1 maps the experts; step 2 is the first measured one
            step_s[step % 2 == 0].append(time.perf_counter() - started)
    watch.close()
    run = gw.load_run(log_root / "fused")
    summary, table = run.table("similarity_summary"), run.table("similarity")
    plain, measured = statistics.median(step_s[False]), statistics.median(step_s[True])
    pool = next(iter(run.meta["similarity"]["pools"].values()))
    print(f"fused experts, {layers} layers x {experts} experts (hidden 32), {pool['rows']} probe rows: "
          f"unmeasured step {plain:.2f} s, measured {measured:.2f} s: one measurement {measured - plain:.2f} s")
    per_step, meta = table.groupby("step").size(), run.meta["similarity"]
    summaries = len(summary) // summary["step"].nunique()
    print(f"rows written per measurement: {per_step.max():,} (every pair, each {meta['full_every']}th measurement) "
          f"or {per_step.min():,} (top {meta['top']} pairs per layer), + {summaries} summary rows; "
          f"pairs per layer {int(summary['pairs'].iloc[0]):,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="100 steps")
    parser.add_argument("--fused", action="store_true", help="fused experts of a tiny-width Qwen3-MoE")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    args = parser.parse_args()
    setup(args.threads)
    if args.fused:
        with tempfile.TemporaryDirectory() as root:
            fused_cost(args.layers, args.experts, Path(root))
        return
    plain = statistics.median(time_steps(census_step(census_mmoe()), 10, warmup=3))
    measurement_cost(plain)
    with tempfile.TemporaryDirectory() as root:
        amortised(100 if args.quick else args.steps, Path(root))


if __name__ == "__main__":
    main()
