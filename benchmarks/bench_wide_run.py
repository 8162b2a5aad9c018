"""A run at 48 router layers x 128 experts: build it once, then measure what it writes and what reads it.

1. Builds (or reuses, from ``--run``) a run of a transformers Qwen3-MoE with 48 layers of 128 experts (top-8,
   tiny widths: hidden 16), trained ``--steps`` steps under a zero-config ``GateWatch`` (every 10, the defaults)
   with the routing probe on (``saturation_every=10``).
2. Prints the bytes each table writes per window (its parquet files over the windows they hold) and, from them,
   the size of a 100k-step run at ``every=10``: every windowed table 10,000 windows, co-activation's full matrix
   every ``coactivation_full_every`` windows, the routing probe every 1,000 steps, and the sample
   groups' table (``group_routing``: 48 x 128 x groups rows per window) estimated from the bytes per row of
   ``router_experts``, whose columns are alike, when the run has none.
3. Times the text report and checks its limits (lines, longest line).

    python benchmarks/bench_wide_run.py [--run /tmp/gatewatch-wide/wide] [--steps 60] [--groups 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

import gatewatch as gw
from gatewatch.report import build_report, render_text
from gatewatch.run_reader import load_run

LAYERS, EXPERTS, TOP_K, EVERY = 48, 128, 8, 10
RUN_STEPS = 100_000
PROBE_EVERY = 1000  # saturation_every assumed for the 100k-step estimate (the built run probes every 10 steps)


def build(path: Path, steps: int) -> None:
    """Train the 48 x 128 model ``steps`` steps under GateWatch, writing the run to ``path``."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                               num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=8,
                               norm_topk_prob=True)
    model = tf.AutoModelForCausalLM.from_config(config)
    for name, p in model.named_parameters():
        if name.endswith("gate.weight"):
            with torch.no_grad():
                p.normal_(0, 0.3)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    watch = gw.GateWatch(model, log_dir=path, every=EVERY, tensorboard=False, saturation_every=EVERY)
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 32), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        watch.step()
    watch.close()


def table_bytes(path: Path) -> dict[str, tuple[int, int]]:
    """Per table: (bytes of all its rows in one zstd parquet file, as the run writer's compaction merges the parts
    of many flushes into one chunk; windows or measured steps they hold). The parts of a short run are too small
    to say what a long run's chunks cost a window: each part file carries its own footer and schema."""
    run = load_run(path)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for folder in sorted((path / "tables").iterdir()):
            if folder.name.startswith("_"):
                continue
            table = run.table(folder.name)
            if not len(table) or "step" not in table:
                continue
            pq.write_table(pa.Table.from_pandas(table, preserve_index=False), Path(tmp) / "t.parquet",
                           compression="zstd")
            out[folder.name] = ((Path(tmp) / "t.parquet").stat().st_size, int(table["step"].nunique()))
    return out


def estimate(path: Path, groups: int) -> None:
    run = load_run(path)
    sizes = table_bytes(path)
    windows = RUN_STEPS // EVERY
    cfg = run.meta.get("coactivation") or {}
    full_every = int(cfg.get("full_every") or 100)
    probe_every = PROBE_EVERY
    total = 0.0
    print(f"{'table':<22}{'bytes/window':>14}{'windows in 100k steps':>24}{'MB':>10}")
    for name, (size, steps) in sizes.items():
        if not steps:
            continue
        per = size / steps
        if name == "coactivation":
            count = windows // full_every + 1
        elif name in ("routing_stability", "routing_sets"):
            count = RUN_STEPS // probe_every
        elif name == "saturation":
            count = RUN_STEPS // probe_every  # written once, at close: one row per layer per probe
        else:
            count = windows
        total += per * count
        print(f"{name:<22}{per:>14,.0f}{count:>24,}{per * count / 1e6:>10.1f}")
    if "group_routing" not in sizes and groups:
        size, steps = sizes["router_experts"]
        per = size / steps * groups  # one row per (layer, expert, group) against router_experts' (layer, expert)
        total += per * windows
        print(f"{'group_routing (est.)':<22}{per:>14,.0f}{windows:>24,}{per * windows / 1e6:>10.1f}")
    on_disk = sum(f.stat().st_size for f in (path / "tables").rglob("*.parquet"))
    print(f"a {RUN_STEPS:,}-step run at {LAYERS} x {EXPERTS} (every={EVERY}): about {total / 1e6:.0f} MB of tables "
          f"(this run: {on_disk / 1e6:.1f} MB on disk in its flush parts, {run.steps} steps)")


def report(path: Path) -> None:
    start = time.perf_counter()
    text = render_text(build_report(load_run(path)))
    lines = text.splitlines()
    print(f"text report: {len(lines)} lines, longest {max(map(len, lines))} chars, "
          f"built in {time.perf_counter() - start:.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("/tmp/gatewatch-wide/wide"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--groups", type=int, default=3, help="sample groups assumed for the size estimate")
    p.add_argument("--rebuild", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.rebuild or not (args.run / "run.json").exists():
        start = time.perf_counter()
        build(args.run, args.steps)
        print(f"built {args.run} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    estimate(args.run, args.groups)
    report(args.run)


if __name__ == "__main__":
    main()
