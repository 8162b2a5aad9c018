"""Bytes per window the sample groups write at 48 layers x 128 experts x 3 groups (Parquet, zstd, as the run
directory writes them), for the layouts one could choose:

* ``as written``: one ``group_routing`` row per gate and group, the per-expert ``share``/``load`` as float32 lists
  every ``group_experts_every`` windows (the default picks it from the model's size), plus ``group_specialisation``;
* ``lists every window``: the same with ``group_experts_every=1``;
* ``long format``: one row per gate x group x expert x window (float64), for comparison.

    python benchmarks/bench_groups_storage.py [--windows 100]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from gatewatch.capture.per_expert import per_expert_due, per_expert_every
from gatewatch.quantities.groups.read import group_tables
from gatewatch.run_format import atomic_write_parquet
from gatewatch.schema import conform

LAYERS, EXPERTS, GROUPS = 48, 128, 3


def window_sums(rng: np.random.Generator, windows: int) -> np.ndarray:
    """Plausible sums of one router over ``windows`` windows: 2,048 tokens a group, Dirichlet shares, top-8."""
    tokens = np.full((windows, GROUPS), 2048.0)
    share = rng.dirichlet(np.full(EXPERTS, 0.5), size=(windows, GROUPS)) * tokens[..., None]
    load = rng.dirichlet(np.full(EXPERTS, 0.5), size=(windows, GROUPS)) * 8 * tokens[..., None]
    base = rng.dirichlet(np.full(EXPERTS, 0.5), size=(windows, GROUPS)) * 8 * tokens[..., None]
    return np.concatenate([tokens, share.reshape(windows, -1), load.reshape(windows, -1),
                           base.reshape(windows, -1), np.zeros((windows, 1))], axis=1)


def written(tables: dict[str, list[pd.DataFrame]], folder: Path) -> int:
    total = 0
    for name, dfs in tables.items():
        path = folder / f"{name}.parquet"
        df = pd.concat(dfs, ignore_index=True)
        atomic_write_parquet(path, conform(name, df) if name.startswith("group_") else df)
        total += path.stat().st_size
    return total


def measure(windows: int, every: int | None, rng: np.random.Generator, folder: Path) -> tuple[int, int]:
    """(bytes per window, windows between per-expert lists) of ``windows`` windows written as one flush."""
    steps = np.arange(1, windows + 1) * 10
    n = every or per_expert_every(LAYERS * GROUPS * EXPERTS)
    detail = per_expert_due(np.arange(windows), LAYERS * GROUPS * EXPERTS, every=n)
    tables: dict[str, list[pd.DataFrame]] = {"group_routing": [], "group_specialisation": []}
    for layer in range(LAYERS):
        for name, df in group_tables(f"model.layers.{layer}.mlp.gate", ["code", "maths", "chat"], True, steps,
                                     window_sums(rng, windows), detail).items():
            tables[name].append(df)
    return written(tables, folder) // windows, n


def long_format(windows: int, rng: np.random.Generator, folder: Path) -> int:
    size = LAYERS * GROUPS * EXPERTS
    df = pd.DataFrame({
        "step": np.repeat(np.arange(1, windows + 1) * 10, size),
        "gate": np.tile(np.repeat([f"model.layers.{i}.mlp.gate" for i in range(LAYERS)], GROUPS * EXPERTS), windows),
        "group": np.tile(np.repeat(["code", "maths", "chat"], EXPERTS), LAYERS * windows),
        "expert": np.tile(np.arange(EXPERTS), LAYERS * GROUPS * windows),
        "share": rng.dirichlet(np.full(EXPERTS, 0.5), size=windows * LAYERS * GROUPS).ravel(),
        "load": rng.dirichlet(np.full(EXPERTS, 0.5), size=windows * LAYERS * GROUPS).ravel() * 8,
    })
    return written({"long": [df]}, folder) // windows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=100, help="windows written in one flush (default 100)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        auto, n = measure(args.windows, None, rng, folder)
        every, _ = measure(args.windows, 1, rng, folder)
        long = long_format(args.windows, rng, folder)
    per_run = 100_000 // 10  # windows of a 100k-step run at every=10
    print(f"{LAYERS} layers x {EXPERTS} experts x {GROUPS} groups, {args.windows} windows a flush:")
    for label, b in ((f"as written (lists every {n} windows)", auto), ("lists every window", every),
                     ("long format, float64", long)):
        print(f"  {label:<36} {b / 1e3:8.1f} kB/window   100k steps at every=10: {b * per_run / 1e6:8.1f} MB")


if __name__ == "__main__":
    main()
