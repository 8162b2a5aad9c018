"""The statistics the experiment scripts report: Fisher's exact test against hand-computed tables, Wilson's
interval against values worked out by hand, and the co-activation summary against a count over every token."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "experiments"))
from common import fisher_exact, wilson
from group_specialisation import EXPERTS, STRONG, pair_structure


@pytest.mark.parametrize(("table", "p"), [
    # 6 of 10 vs 4 of 10: P(k) = C(10,k) C(10,10-k) / C(20,10); every table but k = 5 is as unlikely
    ((6, 4, 4, 6), 1 - 63504 / 184756),
    # Fisher's tea tasting, 3 of 4 right: (1 + 16 + 16 + 1) / 70
    ((3, 1, 1, 3), 34 / 70),
    # the most extreme 20 vs 20 table and its mirror image
    ((0, 20, 20, 0), 2 / math.comb(40, 20)),
    # one margin empty: only one table is possible
    ((0, 5, 0, 5), 1.0),
    # 1 of 20 vs 9 of 20: C(10,k) C(30,20-k) / C(40,20) summed over k = 0, 1, 9, 10
    ((1, 19, 9, 11), sum(math.comb(10, k) * math.comb(30, 20 - k) for k in (0, 1, 9, 10)) / math.comb(40, 20)),
])
def test_fisher_exact_matches_hand_computed_tables(table, p):
    assert fisher_exact(*table) == pytest.approx(p, rel=1e-12)
    a, b, c, d = table
    assert fisher_exact(c, d, a, b) == pytest.approx(p, rel=1e-12)  # the order of the rows does not matter


def test_fisher_exact_rejects_negative_counts():
    with pytest.raises(ValueError, match="counts >= 0"):
        fisher_exact(1, -1, 2, 3)


@pytest.mark.parametrize(("k", "n"), [(10, 20), (0, 20), (20, 20), (1, 20), (13, 20)])
def test_wilson_interval_matches_its_formula_by_hand(k, n):
    # centre (k + z^2/2) / (n + z^2), half width z sqrt(n) / (n + z^2) * sqrt(p (1 - p) + z^2 / (4 n))
    z, p = 1.96, k / n
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(n) / (n + z * z) * math.sqrt(p * (1 - p) + z * z / (4 * n))
    low, high = wilson(k, n)
    assert (low, high) == (pytest.approx(centre - half, abs=1e-12), pytest.approx(centre + half, abs=1e-12))
    assert -1e-12 <= low <= p <= high <= 1 + 1e-12  # inside [0, 1] up to rounding


def test_wilson_interval_of_half_of_twenty():
    low, high = wilson(10, 20)
    assert (round(low, 4), round(high, 4)) == (0.2993, 0.7007)


def test_pair_structure_matches_a_count_over_every_token():
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.full(EXPERTS, 0.5))
    chosen = [tuple(sorted(rng.choice(EXPERTS, 2, replace=False, p=weights))) for _ in range(3000)]
    # the coactivation table's rows: the upper triangle, the diagonal holding the tokens that chose each expert
    counts = {}
    for a, b in chosen:
        for key in ((a, a), (b, b), (a, b)):
            counts[key] = counts.get(key, 0) + 1
    rows = pd.DataFrame([{"expert_a": a, "expert_b": b, "count": c} for (a, b), c in counts.items()])
    got = pair_structure(10, "layer", rows)

    pairs = {pair: chosen.count(pair) for pair in set(chosen)}
    chose = [sum(e in pair for pair in chosen) for e in range(EXPERTS)]
    given = [pairs.get(tuple(sorted((a, b))), 0) / chose[a]
             for a in range(EXPERTS) for b in range(EXPERTS) if a != b and chose[a]]
    ranked = sorted(pairs.values(), reverse=True)
    assert got["tokens"] == len(chosen)
    assert got["strong_pairs"] == sum(p > STRONG for p in given)
    assert got["max_p"] == pytest.approx(max(given))
    assert got["top1_share"] == pytest.approx(ranked[0] / len(chosen))
    assert got["top3_share"] == pytest.approx(sum(ranked[:3]) / len(chosen))
    assert got["top_pair"] == "-".join(map(str, max(pairs, key=pairs.get)))
    assert got["load_max"] == pytest.approx(max(chose) / (2 * len(chosen)))
