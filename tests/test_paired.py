"""Paired bootstrap intervals of accuracy differences, against hand computations."""

import math

import numpy as np
import pytest

from unite_hf.evaluation import paired_difference


def test_interval_matches_the_normal_approximation_by_hand():
    """400 examples, a right on 60 that b gets wrong and wrong on 20 that b gets right: difference 0.1,
    standard error sqrt(var(d)/n) by hand; the percentile bootstrap lands within 10% of mean +- 1.96 se."""
    n = 400
    a, b = np.zeros(n, int), np.zeros(n, int)
    a[:60] = 1          # a only
    b[60:80] = 1        # b only
    a[80:200] = b[80:200] = 1  # both
    d = a - b
    se = math.sqrt(((d - d.mean()) ** 2).mean() / n)
    result = paired_difference([a.tolist()], [b.tolist()], resamples=20_000)
    assert result.difference == pytest.approx(0.1)
    assert result.low == pytest.approx(0.1 - 1.96 * se, abs=0.1 * 1.96 * se)
    assert result.high == pytest.approx(0.1 + 1.96 * se, abs=0.1 * 1.96 * se)
    assert result.confirmed and result.examples == n


def test_seeds_are_averaged_per_example_before_resampling():
    """Two seeds of a: example outcomes (1, 0) and (1, 1) average to (1, 0.5); b is all wrong."""
    result = paired_difference([[1, 0], [1, 1]], [[0, 0]])
    assert result.difference == pytest.approx(0.75)
    assert (result.seeds_a, result.seeds_b) == (2, 1)
    assert 0.5 <= result.low <= result.high <= 1.0


def test_identical_models_are_not_a_confirmed_difference():
    runs = [[1, 0, 1, 1, 0] * 20]
    result = paired_difference(runs, runs)
    assert (result.difference, result.low, result.high, result.confirmed) == (0.0, 0.0, 0.0, False)


def test_a_symmetric_difference_straddles_zero():
    a = [1, 0] * 100
    b = [0, 1] * 100
    result = paired_difference([a], [b])
    assert result.low < 0 < result.high and not result.confirmed


@pytest.mark.parametrize("a, b, message", [
    ([[1, 0, 1]], [[1, 0]], "must match"),
    ([[1, 2]], [[1, 0]], "0/1 outcomes"),
    ([], [[1]], "no runs"),
    ([[1, 0], [1]], [[1, 0]], "0/1 outcomes"),
])
def test_bad_inputs_are_refused(a, b, message):
    with pytest.raises(ValueError, match=message):
        paired_difference(a, b)
