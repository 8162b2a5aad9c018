"""A run at 48 router layers x 128 experts: build it once, then measure what it writes and what reads it.

1. Builds (or reuses, from ``--run``) a run of a transformers Qwen3-MoE with 48 layers of 128 experts (top-8,
   tiny widths: hidden 16), trained ``--steps`` steps under a zero-config ``GateWatch`` (every 10, the defaults)
   with the routing probe on (``saturation_every=10``) and ``--groups`` sample groups (each sequence labelled
   at random; 0: none).
2. Prints the bytes each table writes per window it holds (all its rows rewritten as one zstd parquet file, as
   the run writer's compaction does) and, from them, the size of a 100k-step run at ``every=10``: every windowed
   table 10,000 windows; the per-expert tables (``shares``, ``router_experts``; ``group_routing``'s per-expert
   lists) only the windows their schedule keeps (run.json's ``per_expert_every``: the first, every K-th, the
   last); co-activation's full matrix every ``coactivation_full_every`` windows; the routing probe every 1,000
   steps. Also the bytes the run directory really holds (closed: each table merged into one file).
3. Times the text report and checks its limits (lines, longest line).

    python benchmarks/bench_wide_run.py [--run /tmp/gatewatch-wide/wide3] [--steps 60] [--groups 3] [--rebuild]
    python benchmarks/bench_wide_run.py --light --run /tmp/gatewatch-wide/light3 --steps 300 --rebuild
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import gatewatch as gw
from gatewatch.report import build_report, render_text
from gatewatch.run_reader import load_run

LAYERS, EXPERTS, TOP_K, EVERY = 48, 128, 8, 10
RUN_STEPS = 100_000
PROBE_EVERY = 1000  # saturation_every assumed for the 100k-step estimate (the built run probes every 10 steps)


GROUP_NAMES = ["code", "maths", "chat", "web", "books", "papers"]


def build(path: Path, steps: int, groups: int) -> None:
    """Train the 48 x 128 model ``steps`` steps under GateWatch (``groups`` sample groups), writing the run to
    ``path``."""
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
    names = GROUP_NAMES[:groups] or None
    watch = gw.GateWatch(model, log_dir=path, every=EVERY, tensorboard=False, saturation_every=EVERY,
                         sample_groups=names)
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 32), generator=g)
        with watch.grouped(torch.randint(0, groups, (4,), generator=g)) if groups else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        watch.step()
    watch.close()


def parquet_bytes(table: pd.DataFrame) -> int:
    """Bytes of ``table`` as one zstd parquet file."""
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(pa.Table.from_pandas(table, preserve_index=False), Path(tmp) / "t.parquet", compression="zstd")
        return (Path(tmp) / "t.parquet").stat().st_size


class LightLayer(torch.nn.Module):
    """A 48 x 128 layer without experts: a router over 128 experts (top-8) whose logits favour a few of them."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, EXPERTS)
        self.register_buffer("favour", torch.randn(EXPERTS, generator=torch.Generator().manual_seed(seed)) * 3)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.proj(h) + self.favour
        idx = LIGHT_ROUTER.choose(self, logits.detach())
        return logits, LIGHT_ROUTER.weights_of(logits, idx), idx


LIGHT_ROUTER = gw.Router("softmax", TOP_K, renormalize=True)


def build_light(path: Path, steps: int, groups: int) -> None:
    """The same tables from 48 routers of 128 experts and no experts (256 tokens a step): fast enough on a CPU to
    run a few hundred steps, to measure what a closed run really writes."""
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(LightLayer(i) for i in range(LAYERS)).train()
    gates = {f"model.layers.{i}.mlp.gate": gw.Gate(f"{i}", router=LIGHT_ROUTER) for i in range(LAYERS)}
    watch = gw.GateWatch(layers, gates=gates, log_dir=path, every=EVERY, tensorboard=False, saturation_every=EVERY,
                         sample_groups=GROUP_NAMES[:groups] or None)
    opt = torch.optim.SGD(layers.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        h = torch.randn(8, 32, 16, generator=g)
        with watch.grouped(torch.randint(0, groups, (8,), generator=g)) if groups else contextlib.nullcontext():
            loss = sum(w.sum() + logits.mean() for logits, w, _ in (layer(h.reshape(-1, 16)) for layer in layers))
        loss.backward()
        opt.step()
        opt.zero_grad()
        watch.step()
    watch.close()


def table_bytes(path: Path) -> dict[str, tuple[int, int]]:
    """Per table: (bytes of all its rows in one zstd parquet file, as the run writer's compaction merges the parts
    of many flushes into one chunk; windows or measured steps they hold). The parts of a short run are too small
    to say what a long run's chunks cost a window: each part file carries its own footer and schema.
    ``group_routing`` is split in two: its rows with the per-expert lists (``group_routing:lists``) and the
    scalar rows of the windows without them."""
    run = load_run(path)
    out = {}
    for folder in sorted((path / "tables").iterdir()):
        if folder.name.startswith("_"):
            continue
        table = run.table(folder.name)
        if not len(table) or "step" not in table:
            continue
        parts = {folder.name: table}
        if folder.name == "group_routing":
            lists = table["share"].notna()
            parts = {"group_routing": table[~lists], "group_routing:lists": table[lists]}
        for name, rows in parts.items():
            if len(rows):
                out[name] = (parquet_bytes(rows), int(rows["step"].nunique()))
    return out


def kept_windows(windows: int, every: int) -> int:
    """Windows of ``windows`` that keep their per-expert rows: the first, every ``every``-th after it, the last."""
    return len(range(0, windows, every)) + (1 if (windows - 1) % every else 0)


def estimate(path: Path) -> None:
    run = load_run(path)
    sizes = table_bytes(path)
    windows = RUN_STEPS // EVERY
    cfg = run.meta.get("coactivation") or {}
    full_every = int(cfg.get("full_every") or 100)
    probe_every = PROBE_EVERY
    per_expert = run.meta.get("per_expert_every") or {}
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
        elif name.removesuffix(":lists") in per_expert and name != "group_routing":
            count = kept_windows(windows, int(per_expert[name.removesuffix(":lists")]))
        else:
            count = windows
        total += per * count
        print(f"{name:<22}{per:>14,.0f}{count:>24,}{per * count / 1e6:>10.1f}")
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    groups = len(run.meta.get("sample_groups") or [])
    print(f"a {RUN_STEPS:,}-step run at {LAYERS} x {EXPERTS} with {groups} sample groups (every={EVERY}, "
          f"per-expert rows every {per_expert} windows): about {total / 1e6:.0f} MB of tables")
    print(f"this run ({run.steps} steps, {run.table('routers')['step'].nunique()} windows) holds {on_disk / 1e6:.2f} "
          "MB on disk (run.json, summary and every table file)")


def report(path: Path) -> None:
    start = time.perf_counter()
    text = render_text(build_report(load_run(path)))
    lines = text.splitlines()
    print(f"text report: {len(lines)} lines, longest {max(map(len, lines))} chars, "
          f"built in {time.perf_counter() - start:.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("/tmp/gatewatch-wide/wide3"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--groups", type=int, default=3, help="sample groups of the built run (0: none)")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--light", action="store_true", help="build from 48 bare routers (no experts): a few hundred "
                   "steps run in minutes on a CPU")
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.rebuild or not (args.run / "run.json").exists():
        start = time.perf_counter()
        shutil.rmtree(args.run, ignore_errors=True)
        (build_light if args.light else build)(args.run, args.steps, args.groups)
        print(f"built {args.run} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    estimate(args.run)
    report(args.run)


if __name__ == "__main__":
    main()
