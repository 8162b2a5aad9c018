"""The benchmarks' interleaved timing: every side runs at every position of a round and after each of its
neighbours equally often, and the paired ratio's interval holds the median of the per-round ratios."""

from __future__ import annotations

import statistics
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import interleaved, paired_ratio, round_order


@pytest.mark.parametrize("sides", [2, 3, 4, 5])
def test_every_side_takes_every_position_and_follows_both_neighbours(sides: int) -> None:
    names = [f"s{i}" for i in range(sides)]
    rounds = [round_order(names, r) for r in range(2 * sides)]
    assert all(sorted(order) == names for order in rounds)
    positions = Counter((name, order.index(name)) for order in rounds for name in order)
    assert set(positions.values()) == {2} and len(positions) == sides * sides
    before = Counter((order[i - 1], order[i]) for order in rounds for i in range(1, sides))
    for i in range(sides):  # each side runs right after both of its cyclic neighbours
        assert before[(names[i - 1], names[i])] > 0 and before[(names[(i + 1) % sides], names[i])] > 0


def test_interleaved_runs_each_side_in_rounds_of_one_block() -> None:
    calls: list[str] = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    times = interleaved(fns, steps=7, block=2, warmup=1)
    assert {name: len(t) for name, t in times.items()} == {"a": 7, "b": 7, "c": 7}
    assert calls[:3] == ["a", "b", "c"]  # the warm-up
    rounds = "".join(calls[3:])  # 3 rounds of blocks of 2 steps, rotating; then 1 step each, the cycle reversed
    assert rounds == "aabbcc" + "bbccaa" + "ccaabb" + "cba"


def test_paired_ratio_is_the_median_of_per_round_ratios_with_an_interval_around_it() -> None:
    base = [1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 4.0, 4.0, 1.0, 1.0]
    other = [1.1, 1.1, 2.0, 2.0, 1.3, 1.3, 4.4, 4.4, 1.2, 1.2]
    ratios = [1.1, 1.0, 1.3, 1.1, 1.2]
    median, low, high = paired_ratio(base, other, block=2)
    assert median == pytest.approx(statistics.median(ratios))
    assert low == pytest.approx(min(ratios)) and high == pytest.approx(max(ratios))  # 5 rounds: ranks 0 and 4
