"""Welch's t-test of two methods' seeds (mrl.compare.significance) against hand numbers and scipy."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from mrl.compare.significance import exceeds_noise, p_value, welch


def test_welch_matches_hand_numbers():
    # a: mean 2, sample variance 1; b: mean 6, sample variance 4 (3 values each)
    test = welch([1.0, 2.0, 3.0], [4.0, 6.0, 8.0])
    se = math.sqrt(1 / 3 + 4 / 3)
    assert test.gap == pytest.approx(-4.0)
    assert test.se == pytest.approx(se)
    assert test.t == pytest.approx(-4.0 / se)
    # Welch-Satterthwaite: (1/3 + 4/3)^2 / ((1/3)^2 / 2 + (4/3)^2 / 2) = 50/17
    assert test.df == pytest.approx(50 / 17)
    assert 0.05 < test.p < 0.1  # |t| = 3.10 on 2.94 df: between the 5% (3.18) and 10% (2.35) points


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([63.2, 72.3, 54.1, 70.0, 58.8], [66.1, 64.8, 67.5, 65.9, 68.0]),  # equal sizes, unequal spread
        ([90.1, 90.5, 89.7], [88.0, 88.4, 87.9, 88.6, 88.1, 87.7]),  # unequal sizes, a clear gap
        ([1.0, 1.0, 1.1], [1.0, 0.9]),
    ],
)
def test_welch_matches_scipy(a, b):
    test = welch(a, b)
    reference = stats.ttest_ind(a, b, equal_var=False)
    assert test.t == pytest.approx(reference.statistic)
    assert test.p == pytest.approx(reference.pvalue)
    assert test.df == pytest.approx(reference.df)
    # against a non-zero difference: the same test of a shifted by it
    shifted = welch(a, b, delta=-1.0)
    reference = stats.ttest_ind([x + 1.0 for x in a], b, equal_var=False)
    assert shifted.gap == pytest.approx(test.gap) and shifted.delta == -1.0
    assert shifted.t == pytest.approx(reference.statistic) and shifted.p == pytest.approx(reference.pvalue)


def test_welch_edge_cases():
    assert welch([1.0], [1.0, 2.0]) is None and welch([1.0, 2.0], []) is None  # no variance on a side
    still = welch([5.0, 5.0], [3.0, 3.0])
    assert still.se == 0.0 and still.p == 0.0 and still.t == math.inf and exceeds_noise(still)
    equal = welch([5.0, 5.0], [5.0, 5.0])
    assert equal.p == 1.0 and not exceeds_noise(equal)
    assert exceeds_noise(welch([90.1, 90.5, 89.7], [88.0, 88.4, 87.9]))
    assert not exceeds_noise(welch([63.2, 72.3, 54.1, 70.0, 58.8], [66.1, 64.8, 67.5, 65.9, 68.0]))


def test_p_value_keeps_small_values_readable():
    assert [p_value(p) for p in (0.5, 0.125, 0.0104, 0.0042, 0.0009)] == [
        "p=0.50",
        "p=0.12",
        "p=0.01",
        "p=0.004",
        "p<0.001",
    ]
