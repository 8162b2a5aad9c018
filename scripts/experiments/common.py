"""What the experiment scripts share: running many short trainings on at most 2 processes, summarising a
run's gate findings, writing results (CSV / JSON) and figures (HTML, plus PNG when kaleido is installed)."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import gatewatch as gw
from gatewatch.training import TrainConfig, load_dataset, loop, train

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "docs" / "experiments"
MAX_WORKERS = 2


def parser(description: str, *, seeds: int, steps: int) -> argparse.ArgumentParser:
    """Options every experiment takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--seeds", type=int, default=seeds, help=f"training seeds per setting (default {seeds})")
    p.add_argument("--steps", type=int, default=steps, help=f"training steps per run (default {steps})")
    p.add_argument("--workers", type=int, default=MAX_WORKERS, help="processes, at most 2 (default 2)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for results and figures")
    p.add_argument("--tag", default="", help="suffix of the result file names (e.g. 'small' for a quick check)")
    return p


def gate_summary(run_dir: Path) -> dict[str, Any]:
    """The findings of a watched run, its gates' last window (mean top share, per-sample sharpness) and, per
    gate, the first window in which the polarization rule's condition held (``first_polarized``: when the
    finding would first have fired) and the step the final finding gives (``polarized_since``: polarized in
    every window from then to the end)."""
    run = gw.load_run(run_dir)
    found = gw.find(run)
    windows = run.gates.dropna(subset=["samples"]).sort_values("step")
    gates = windows.groupby("gate", sort=False).tail(1)
    over = windows[windows["top_share"] >= gw.Thresholds().collapse_share]
    return {
        "findings": sorted({f.code for f in found}),
        "top_share": {str(g): float(v) for g, v in zip(gates["gate"], gates["top_share"], strict=True)},
        "sharp_samples": {str(g): float(v) for g, v in zip(gates["gate"], gates["polarization"], strict=True)},
        "first_polarized": {str(g): int(v) for g, v in over.groupby("gate", sort=False)["step"].min().items()},
        "polarized_since": {str(f.gate): f.step for f in found if f.code == "polarization"},
    }


def run_job(job: dict[str, Any], summarise: Callable[[Path], dict[str, Any]] = gate_summary) -> dict[str, Any]:
    """Train one configuration (in a temporary folder) and return its labels, metrics and what ``summarise``
    reads from the watched run (the gate summary by default)."""
    torch.set_num_threads(1)
    config = TrainConfig(**job["config"])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gatewatch-exp-") as tmp:
        result = train(config, Path(tmp) / "run", progress=False)
        summary = summarise(result.run_dir) if config.watch else {}
    metrics = result.metrics
    return {**job["labels"], "test": metrics["test"], "val": metrics["val"], "history": metrics["history"], **summary,
            "seconds": time.perf_counter() - started}


def reuse_data_sets() -> None:
    """Make ``train`` in this process load each data set once (census takes seconds to read and encode); the
    splits are only read by training, so the runs of one worker can share them."""
    loop.load_dataset = functools.lru_cache(maxsize=4)(load_dataset)  # type: ignore[assignment]


def run_all(jobs: list[dict[str, Any]], workers: int,
            on_row: Callable[[dict[str, Any]], None] | None = None, *,
            worker: Callable[[dict[str, Any]], dict[str, Any]] = run_job) -> list[dict[str, Any]]:
    """Run ``jobs`` ({"labels": {...}, "config": TrainConfig kwargs}) through ``worker`` on at most 2 processes,
    in order; ``on_row(row)`` sees each result as it comes."""
    workers = max(1, min(workers, MAX_WORKERS, len(jobs)))
    out = []
    started = time.perf_counter()
    with Pool(workers, initializer=reuse_data_sets) as pool:
        for i, row in enumerate(pool.imap(worker, jobs), 1):
            labels = " ".join(f"{k}={v}" for k, v in jobs[i - 1]["labels"].items())
            print(f"[{i}/{len(jobs)} {time.perf_counter() - started:6.0f}s] {labels}", flush=True)
            out.append(row)
            if on_row is not None:
                on_row(row)
    return out


def job(labels: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    return {"labels": labels, "config": asdict(config)}


def write_results(rows: Iterable[dict[str, Any]], out: Path, stem: str, meta: dict[str, Any]) -> Path:
    """``stem.csv`` (flat rows, no curves) and ``stem.json`` (rows with validation curves, plus the command's
    settings); returns the CSV path."""
    out.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    pd.json_normalize([{k: v for k, v in r.items() if k != "history"} for r in rows]).to_csv(out / f"{stem}.csv",
                                                                                          index=False)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    return out / f"{stem}.csv"


def save_figure(fig: Any, out: Path, stem: str, width: int = 900, height: int = 500) -> list[Path]:
    """Write a plotly figure as ``stem.html`` (plotly.js from a CDN) and ``stem.png`` (``width`` x ``height``
    pixels) when kaleido is installed."""
    paths = [out / f"{stem}.html"]
    fig.write_html(paths[0], include_plotlyjs="cdn")
    try:
        import kaleido  # noqa: F401
    except ImportError:
        print(f"kaleido is not installed: {stem}.png skipped (pip install kaleido to export PNGs)")
        return paths
    fig.write_image(out / f"{stem}.png", width=width, height=height, scale=1)
    return [*paths, out / f"{stem}.png"]


def settings(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The command's settings as stored next to its results."""
    return {"args": {k: _relative(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "torch": torch.__version__, "cpu_count": os.cpu_count(), **extra}


def _relative(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (results do not name this machine's folders)."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def fisher_exact(a: int, b: int, c: int, d: int) -> float:
    """Two-sided p-value of Fisher's exact test for the 2x2 table [[a, b], [c, d]] (e.g. polarized / not, in
    two settings): the probability, with the margins fixed, of every table no likelier than the one observed."""
    if min(a, b, c, d) < 0:
        raise ValueError(f"a 2x2 table needs counts >= 0, got {[a, b, c, d]}.")
    row, col, n = a + b, a + c, a + b + c + d
    total = math.comb(n, row)

    def prob(k: int) -> float:
        return math.comb(col, k) * math.comb(n - col, row - k) / total

    observed = prob(a)
    ks = range(max(0, row + col - n), min(row, col) + 1)
    return min(1.0, sum(p for p in map(prob, ks) if p <= observed * (1 + 1e-9)))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's score interval (95% with the default ``z``) of a share of ``k`` in ``n``."""
    p, d = k / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return mid - half, mid + half
