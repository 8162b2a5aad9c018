"""Memory and disk of a long run: host and device memory stay flat, the run directory grows linearly.

Simulates ``--steps`` training steps cheaply but through the real code path: a model made of two
softmax gates (one per task) fed random logits ``[batch, experts]``, so every step runs GateWatch's
forward hooks, ``log_losses`` and ``step()`` exactly as in training (window sums on the device, one
transfer per flush, Parquet parts, levelled merges, TensorBoard events). It samples, at log-spaced
steps: the process RSS (``VmRSS`` of ``/proc/self/status``), the Python heap (``tracemalloc``), the
device memory (CUDA), and the run directory's bytes and file count. It prints a table and the bytes
per 1,000 steps, and with ``--json`` writes every sample.

    python benchmarks/bench_long_run.py --steps 1000000                      # the figures in docs/reliability.md
    python benchmarks/bench_long_run.py --steps 1000000 --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gatewatch as gw

TASKS = ("ctr", "like")


class GatesOnly(nn.Module):
    """Just the gates of an MMoE: one softmax per task over its own logits ``[N, E]``."""

    def __init__(self) -> None:
        super().__init__()
        self.gates = nn.ModuleDict({t: nn.Softmax(-1) for t in TASKS})

    def forward(self, logits: torch.Tensor) -> list[torch.Tensor]:
        return [self.gates[t](logits[i]) for i, t in enumerate(TASKS)]


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def folder_size(path: Path) -> tuple[int, int]:
    """Bytes and number of files under ``path`` (files may vanish while a merge runs)."""
    size = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                size += (Path(root) / name).stat().st_size
                files += 1
            except FileNotFoundError:
                continue
    return size, files


def sample_steps(steps: int, per_decade: int = 4) -> list[int]:
    """Log-spaced steps from 1,000 to ``steps`` (powers of ten included), every tenth of the run, and ``steps``."""
    points = {steps, *(steps * i // 10 for i in range(1, 10))}
    decade = 1_000
    while decade <= steps:
        points |= {int(decade * 10 ** (i / per_decade)) for i in range(per_decade)}
        decade *= 10
    return sorted(p for p in points if p <= steps)


def simulate(
    log_dir: str | os.PathLike[str], steps: int, *, every: int = 10, flush_every: int = 1_000, batch: int = 32,
    experts: int = 8, device: str = "cpu", tensorboard: bool = True, compact_every: int | None = None,
    trace: bool = True, on_sample: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``steps`` steps and return one sample dict per sampled step (and one after ``close()``)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    model = GatesOnly().to(dev)
    generator = torch.Generator(device=dev).manual_seed(0)
    base = torch.randn(len(TASKS), batch, experts, device=dev, generator=generator)
    noise = torch.empty_like(base)
    path = Path(log_dir)
    if trace:
        tracemalloc.start(1)
    watch = gw.GateWatch(model, tasks=list(TASKS), log_dir=path, every=every, flush_every=flush_every,
                         tensorboard=tensorboard)
    if compact_every is not None and watch.writer is not None:
        watch.writer.compact_every = compact_every
    samples: list[dict[str, Any]] = []
    started = time.perf_counter()

    def sample(step: int, phase: str) -> None:
        gc.collect()  # count only what is still referenced
        if cuda:
            torch.cuda.synchronize(dev)
        run_bytes, run_files = folder_size(path / "tables")
        tb_bytes, tb_files = folder_size(path / "tensorboard")
        row = {
            "step": step, "phase": phase, "seconds": time.perf_counter() - started, "rss": rss_bytes(),
            "heap": tracemalloc.get_traced_memory()[0] if trace else None,
            "device": torch.cuda.memory_allocated(dev) if cuda else None,
            "table_bytes": run_bytes, "table_files": run_files, "tensorboard_bytes": tb_bytes,
            "tensorboard_files": tb_files,
        }
        samples.append(row)
        if on_sample is not None:
            on_sample(row)

    points = iter(sample_steps(steps))
    next_point = next(points)
    for step in range(1, steps + 1):
        logits = torch.add(base, noise.normal_(generator=generator), alpha=2.0)
        probs = model(logits)
        watch.log_losses({t: p[:, 0].mean() for t, p in zip(TASKS, probs, strict=True)})
        watch.step()
        if step == next_point:
            sample(step, "run")
            next_point = next(points, 0)
    watch.close()
    sample(steps, "closed")
    if trace:
        tracemalloc.stop()
    return samples


def summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures docs/reliability.md quotes: memory at 10k / 100k / last step, growth, bytes per 1,000 steps."""
    run = [s for s in samples if s["phase"] == "run"]
    closed = samples[-1]
    last = run[-1]
    warm = next((s for s in run if s["step"] >= min(10_000, last["step"] // 10)), run[0])
    at = {s["step"]: s for s in run}

    def mib(value: int | None) -> float | None:
        return None if value is None else round(value / 2**20, 2)

    return {
        "steps": last["step"], "seconds": round(closed["seconds"], 1),
        "rss_mib": {str(k): mib(at[k]["rss"]) for k in (10_000, 100_000, last["step"]) if k in at},
        "rss_growth_after_warmup_mib": mib(last["rss"] - warm["rss"]),
        "heap_growth_after_warmup_mib": mib(last["heap"] - warm["heap"]) if last["heap"] is not None else None,
        "device_mib": {str(k): mib(at[k]["device"]) for k in (10_000, 100_000, last["step"]) if k in at},
        "table_bytes_per_1000_steps": round(last["table_bytes"] / last["step"] * 1000),
        "table_bytes_per_1000_steps_closed": round(closed["table_bytes"] / closed["step"] * 1000),
        "tensorboard_bytes_per_1000_steps": round(closed["tensorboard_bytes"] / closed["step"] * 1000),
        "max_table_files": max(s["table_files"] for s in run), "table_files_closed": closed["table_files"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--flush-every", type=int, default=1_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-tracemalloc", action="store_true", help="faster; no Python heap figures")
    parser.add_argument("--json", help="write every sample and the summary to this file")
    parser.add_argument("--log-dir", help="keep the run here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = f"{'step':>9} {'sec':>7} {'RSS MiB':>8} {'heap MiB':>8} {'dev MiB':>8} {'tables KiB':>10} {'files':>5}"
    print(header)

    samples: list[dict[str, Any]] = []

    def show(s: dict[str, Any]) -> None:
        samples.append(s)
        if args.json:  # rewritten at every sample: a run stopped early keeps what it measured
            Path(args.json).write_text(json.dumps({"args": vars(args), "samples": samples}, indent=1))
        heap = "-" if s["heap"] is None else f"{s['heap'] / 2**20:.2f}"
        dev = "-" if s["device"] is None else f"{s['device'] / 2**20:.2f}"
        print(f"{s['step']:>9} {s['seconds']:>7.1f} {s['rss'] / 2**20:>8.1f} {heap:>8} {dev:>8} "
              f"{s['table_bytes'] / 1024:>10.1f} {s['table_files']:>5}  {s['phase']}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(args.log_dir) if args.log_dir else Path(tmp) / "run"
        simulate(log_dir, args.steps, every=args.every, flush_every=args.flush_every, batch=args.batch,
                           experts=args.experts, device=args.device, trace=not args.no_tracemalloc, on_sample=show)
    result = summary(samples)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": result, "samples": samples}, indent=1))


if __name__ == "__main__":
    main()
