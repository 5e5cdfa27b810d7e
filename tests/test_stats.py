"""The confirmation statistics against a hand-computed case and against scipy.stats."""

from __future__ import annotations

import math
import random

import pytest
from scipy import stats as sp

from sweep.views.stats import seeds_needed, t_interval, verdict, welch

A = [1.0, 2.0, 3.0, 4.0, 5.0]
B = [2.0, 4.0, 6.0, 8.0, 10.0]


def test_t_interval_by_hand():
    # mean 3, s = sqrt(2.5); t(0.975, 4) = 2.776 (printed t tables); half = 2.776 * s / sqrt(5)
    got = t_interval(A)
    assert (got.n, got.mean) == (5, 3.0)
    assert got.std == pytest.approx(math.sqrt(2.5))
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    assert got.low == pytest.approx(3 - half, abs=1e-3)
    assert got.high == pytest.approx(3 + half, abs=1e-3)


def test_welch_by_hand():
    # se^2 = 2.5/5 + 10/5 = 2.5; df = 2.5^2 / (0.5^2/4 + 2^2/4) = 6.25 / 1.0625 = 5.882
    d = welch(A, B, "a", "b")
    assert d.diff == pytest.approx(-3.0)
    assert d.df == pytest.approx(6.25 / 1.0625)
    half = sp.t.ppf(0.975, 6.25 / 1.0625) * math.sqrt(2.5)
    assert (d.low, d.high) == (pytest.approx(-3 - half), pytest.approx(-3 + half))
    assert 2.447 < half / math.sqrt(2.5) < 2.571  # t(0.975, 5.88) lies between t6 and t5


@pytest.mark.parametrize("seed", range(5))
def test_against_scipy(seed):
    rng = random.Random(seed)
    a = [rng.gauss(0.55, 0.01) for _ in range(rng.randint(2, 8))]
    b = [rng.gauss(0.54, 0.03) for _ in range(rng.randint(2, 8))]
    one = t_interval(a)
    ref = sp.ttest_1samp(a, 0.0).confidence_interval(0.95)
    assert (one.low, one.high) == (pytest.approx(ref.low), pytest.approx(ref.high))
    d = welch(a, b)
    ref = sp.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (d.low, d.high) == (pytest.approx(ref.low), pytest.approx(ref.high))


def test_seeds_needed_is_the_normal_approximation():
    # Lehr's rule of thumb: about 16 / d^2 per group for 80% power at alpha 0.05, d = diff / sd
    assert seeds_needed(1.0, 1.0, 1.0) == 16
    assert seeds_needed(1.0, 1.0, 0.5) == 63
    assert seeds_needed(1.0, 1.0, 0.0) is None


def test_a_verdict_only_when_the_interval_excludes_zero():
    close = welch([0.50, 0.52, 0.51], [0.505, 0.515, 0.50], "cosine", "plateau")
    assert close.low < 0 < close.high and not close.detected
    text = verdict(close, scale=100, unit=" points")
    assert text.startswith("no detectable difference with 3 seeds")
    assert "better" not in text and "seeds per group would be needed" in text
    far = welch([0.60, 0.61, 0.62], [0.50, 0.51, 0.52], "cosine", "plateau")
    assert far.detected and verdict(far).startswith("cosine is better")
    assert verdict(welch([0.5], [0.4, 0.41])).endswith("needs 2 each)")
    # a difference the normal approximation says 3 seeds would find, not found with 3
    optimistic = welch([0.312, 0.316, 0.308], [0.292, 0.280, 0.302], "a", "b")
    assert not optimistic.detected and optimistic.seeds_needed <= 3
    assert "optimistic at so few seeds" in verdict(optimistic)
    assert t_interval([0.5]).low is None
