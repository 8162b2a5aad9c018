"""The shared checks of user settings (gatewatch.validate) and the load coefficient of variation (gatewatch.stats):
one definition each, used by every caller."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from gatewatch.ablation.errors import AblationError
from gatewatch.ablation.rates import check_seeds
from gatewatch.schedules import every
from gatewatch.stats import load_cv, load_cv_by
from gatewatch.validate import dropout_rate, is_dropout_rate, non_negative_int, positive_int


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.int32(1)])
def test_positive_int_accepts_whole_numbers_and_returns_an_int(value) -> None:
    out = positive_int("every", value)
    assert out == value and type(out) is int


@pytest.mark.parametrize(("value", "fix"), [
    (0, "pass a whole number >= 1"), (-2, "pass a whole number >= 1"), (True, "not True"),
    (2.5, "pass a whole number >= 1"), (4.0, "pass it as an int: 4"), ("3", "pass a whole number >= 1"),
    (None, "pass a whole number >= 1"), (math.nan, "pass a whole number >= 1"),
])
def test_positive_int_names_the_setting_the_value_and_the_fix(value, fix) -> None:
    with pytest.raises(ValueError, match="every must be a positive integer") as err:
        positive_int("every", value)
    assert repr(value) in str(err.value) and fix in str(err.value)


def test_unit_and_owner_appear_in_the_message() -> None:
    with pytest.raises(ValueError, match=r"^GateWatchCallback: every must be a positive integer \(steps\), got 0"):
        positive_int("every", 0, unit="steps", owner="GateWatchCallback")


def test_non_negative_int_accepts_zero_only_as_the_lowest() -> None:
    assert non_negative_int("at_step", 0) == 0
    with pytest.raises(ValueError, match="at_step must be a non-negative integer, got -1: pass a whole number >= 0"):
        non_negative_int("at_step", -1)


@pytest.mark.parametrize("value", [0, 0.0, 0.5, np.float32(0.1), 0.999])
def test_dropout_rates(value) -> None:
    assert is_dropout_rate(value) and dropout_rate("p", value) == pytest.approx(float(value))


@pytest.mark.parametrize("value", [1, 1.0, -0.1, math.nan, math.inf, True, "0.1", None])
def test_not_dropout_rates(value) -> None:
    assert not is_dropout_rate(value)
    with pytest.raises(ValueError, match=r"GateDropout: p must be a number with 0 <= p < 1"):
        dropout_rate("p", value, owner="GateDropout")


def test_callers_use_the_shared_checks() -> None:
    with pytest.raises(ValueError, match=r"every\(n\): n must be a positive integer \(steps\)"):
        every(0)
    with pytest.raises(AblationError, match="each seed must be a non-negative integer, got -1"):
        check_seeds([0, -1])
    with pytest.raises(AblationError, match="at least one seed"):
        check_seeds([])
    assert check_seeds([np.int64(2), 0, 2]) == [2, 0]


# ---------------------------------------------------------------- load coefficient of variation
def test_load_cv_is_population_std_over_mean() -> None:
    rng = np.random.default_rng(0)
    u = rng.random(8)
    assert load_cv(u) == pytest.approx(u.std() / u.mean())
    assert load_cv([0.25, 0.25, 0.25, 0.25]) == 0.0
    assert load_cv([1.0, 0.0, 0.0, 0.0]) == pytest.approx(math.sqrt(3))  # one expert takes everything
    assert load_cv(pd.Series([1.0, math.nan, 3.0])) == pytest.approx(0.5)  # NaN left out, as pandas does


@pytest.mark.parametrize("values", [[], [0.0, 0.0], [math.nan], [1.0, math.inf], [-1.0, 0.5]])
def test_load_cv_is_undefined_without_a_positive_finite_mean(values) -> None:
    assert load_cv(values) is None


def test_load_cv_by_group_matches_load_cv_of_each_group() -> None:
    df = pd.DataFrame({"step": [1, 1, 1, 2, 2, 2, 3, 3], "utilization": [0.2, 0.3, 0.5, 0, 0, 0, 1.0, math.nan]})
    by = load_cv_by(df, "step")
    for step, rows in df.groupby("step"):
        expected = load_cv(rows["utilization"])
        assert (math.isnan(by[step]) if expected is None else by[step] == pytest.approx(expected))
