"""Shared benchmark pieces: a census-sized MMoE training step, and interleaved timing in one process.

Monitored and unmonitored steps run in the same process, alternating in blocks (the order rotates every
round, :func:`round_order`), so slow drifts of the machine (other load, thermal, caches) hit both sides alike. Report
ratios, not absolute times: the absolute numbers depend on the machine.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from gatewatch.models import MMoE

CENSUS_TASKS = ("income", "marital")
MORE_TASKS = ("education", "employment")  # the 3rd and 4th task of a census model with more tasks
CENSUS_SIZE = {"in_dim": 499, "n_experts": 8, "expert_hidden": (256,), "expert_dim": 128}
CENSUS_BATCH = 1024


def setup(threads: int = 2) -> None:
    """Fix the thread count and flush denormal floats (tiny gradients late in training slow CPU math)."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def census_tasks(k: int = 2) -> list[str]:
    """The names of ``k`` (2 to 4) census tasks."""
    if not 2 <= k <= len(CENSUS_TASKS + MORE_TASKS):
        raise ValueError(f"the census benchmarks have 2 to {len(CENSUS_TASKS + MORE_TASKS)} tasks, got {k}.")
    return list((CENSUS_TASKS + MORE_TASKS)[:k])


def census_mmoe(seed: int = 0, tasks: int = 2) -> MMoE:
    """The MMoE of the census experiments: input 499, 8 experts 499 -> 256 -> 128, ``tasks`` tasks (2 by default)."""
    torch.manual_seed(seed)
    return MMoE(tasks=census_tasks(tasks), **CENSUS_SIZE)


def census_batches(count: int = 4, batch: int = CENSUS_BATCH, seed: int = 0, tasks: int = 2
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` random batches ``(x [batch, 499], y [batch, tasks])`` to cycle through."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, CENSUS_SIZE["in_dim"], generator=g),
         torch.randint(0, 2, (batch, tasks), generator=g).float())
        for _ in range(count)
    ]


def training_step(model: nn.Module, watch=None, *, lr: float = 1e-3, seed: int = 0) -> Callable[[], None]:
    """One Adam step per call on the census batches (one target per task of ``model.tasks``); through
    ``watch.backward`` / ``watch.step`` if given."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    tasks = list(model.tasks)
    batches = census_batches(seed=seed, tasks=len(tasks))
    bce = nn.functional.binary_cross_entropy_with_logits
    count = [0]

    def step() -> None:
        x, y = batches[count[0] % len(batches)]
        count[0] += 1
        losses = {t: bce(out, y[:, i]) for i, (t, out) in enumerate(zip(tasks, model(x), strict=True))}
        if watch is None:
            sum(losses.values()).backward()
        else:
            watch.backward(losses)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if watch is not None:
            watch.step()

    return step


def time_steps(fn: Callable[[], object], n: int, warmup: int = 0) -> list[float]:
    """Seconds of each of ``n`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def interleaved(
    fns: Mapping[str, Callable[[], object]], steps: int, block: int, warmup: int = 5
) -> dict[str, list[float]]:
    """Per-step seconds of each function, run in rounds of one block of ``block`` steps each until each has
    ``steps`` timed steps.

    The order rotates by one function every round (so every function runs first, second ... equally often)
    and runs backwards in every other cycle of rotations (so each follows both of its neighbours): a function
    is not favoured by where it runs in a round or by which model ran just before it.
    """
    names = list(fns)
    for name in names:
        time_steps(fns[name], 0, warmup)
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds = 0
    while len(times[names[0]]) < steps:
        n = min(block, steps - len(times[names[0]]))
        for name in round_order(names, rounds):
            times[name] += time_steps(fns[name], n)
        rounds += 1
    return times


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """The order of the functions in round ``round_index`` of :func:`interleaved`."""
    shift = round_index % len(names)
    order = [*names[shift:], *names[:shift]]
    return order[::-1] if (round_index // len(names)) % 2 else order


def interleaved_flush_secs(sides: int, flush_secs: float = 5.0) -> float:
    """``flush_secs`` for a watch that shares the wall clock with ``sides`` interleaved step functions.

    :func:`interleaved` gives each side about 1/``sides`` of the wall time, so a watch passed the default 5 s
    would flush ``sides`` times as often, per step of its own, as in a run that trains one model (where, at
    50 ms a step, 5 s and ``flush_every=100`` coincide). ``sides`` x 5 s keeps that run's flush rate.
    """
    return sides * flush_secs


def paired_ratio(base_s: Sequence[float], monitored_s: Sequence[float], block: int) -> tuple[float, float, float]:
    """The median over rounds of one side's block median / the other's (both from the same round of
    :func:`interleaved`, so slow drifts of the machine cancel), with a distribution-free 95% interval of that
    median (order statistics: ranks n/2 -+ 0.98 sqrt(n))."""
    n = min(len(base_s), len(monitored_s)) // block
    ratios = sorted(statistics.median(monitored_s[i * block : (i + 1) * block])
                    / statistics.median(base_s[i * block : (i + 1) * block]) for i in range(n))
    half = 0.98 * math.sqrt(n)
    low, high = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return statistics.median(ratios), ratios[low], ratios[high]


def paired_mean_ratio(base_s: Sequence[float], monitored_s: Sequence[float], block: int, resamples: int = 2000
                      ) -> tuple[float, float, float]:
    """The ratio of the total times (the mean ratio: what the wall clock sees, flushes included) over the rounds of
    :func:`interleaved`, with a 95% interval from a paired bootstrap: whole rounds (one block of each side) are
    resampled, so slow drifts of the machine stay paired and a round with a flush stays one draw."""
    n = min(len(base_s), len(monitored_s)) // block
    pairs = [(sum(base_s[i * block : (i + 1) * block]), sum(monitored_s[i * block : (i + 1) * block]))
             for i in range(n)]
    rng = random.Random(0)
    ratios = []
    for _ in range(resamples):
        draw = [pairs[rng.randrange(n)] for _ in range(n)]
        ratios.append(sum(m for _, m in draw) / sum(b for b, _ in draw))
    ratios.sort()
    total = sum(m for _, m in pairs) / sum(b for b, _ in pairs)
    return total, ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]


def ratio_report(name: str, base_s: Sequence[float], monitored_s: Sequence[float]) -> str:
    """One line: median and mean step time of each side (ms) and their ratios.

    The median ratio is the cost of a typical step; the mean ratio includes the rare expensive steps
    (flushes to disk), so it is the cost over a whole run.
    """
    med_b, med_m = statistics.median(base_s), statistics.median(monitored_s)
    mean_b, mean_m = statistics.fmean(base_s), statistics.fmean(monitored_s)
    return (
        f"{name:<38} plain {med_b * 1e3:7.2f} ms (mean {mean_b * 1e3:7.2f})   monitored {med_m * 1e3:7.2f} ms "
        f"(mean {mean_m * 1e3:7.2f})   ratio {med_m / med_b:6.3f}x median, {mean_m / mean_b:6.3f}x mean"
    )
