"""How sure an answer is: the statistics of ``sweep confirm``'s replicates. Pure functions of
numbers; nothing here knows Optuna or MLflow.

Methods (the report states them):

* one group's mean: Student t interval, ``mean ± t(0.975, n-1) · s/√n`` (s: the sample standard
  deviation, n-1 in the denominator);
* a difference of two groups' means: Welch's t interval, ``Δ ± t(0.975, ν) · √(s₁²/n₁ + s₂²/n₂)``
  with the Welch–Satterthwaite ν. The groups are treated as independent although the
  replicates share seeds (pairing by seed would be tighter only if a seed's luck carried across
  configurations, which nothing guarantees);
* a verdict only when that interval excludes zero; otherwise "no detectable difference" and the
  seeds per group a two-sided test at alpha 0.05 would need for 80% power if the true
  difference were the observed one (normal approximation:
  ``n = (z(0.975) + z(0.8))² · (s₁² + s₂²) / Δ²``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

LEVEL = 0.95
POWER = 0.80
T_METHOD = "Student t interval (mean ± t(0.975, n-1)·s/√n)"
DIFF_METHOD = ("Welch t interval for the difference of means (groups treated as independent, "
               "Welch–Satterthwaite degrees of freedom)")
POWER_METHOD = ("seeds per group for 80% power at alpha 0.05 (two-sided) if the true difference "
                "were the observed one: normal approximation n = (z₀.₉₇₅ + z₀.₈)²·(s₁² + s₂²)/Δ²")


def _t(df: float, level: float = LEVEL) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def _z(p: float) -> float:
    return statistics.NormalDist().inv_cdf(p)


@dataclass(frozen=True)
class Interval:
    """Mean, sample standard deviation and a t interval of one group's values (std and the
    interval are None with fewer than two values)."""

    n: int
    mean: float | None
    std: float | None
    low: float | None
    high: float | None


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return Interval(0, None, None, None, None)
    mean = statistics.fmean(xs)
    if n < 2:
        return Interval(n, mean, None, None, None)
    std = statistics.stdev(xs)
    half = _t(n - 1, level) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Difference:
    """``a`` minus ``b``: the difference of means with a Welch t interval."""

    a: str
    b: str
    n_a: int
    n_b: int
    diff: float | None
    low: float | None
    high: float | None
    df: float | None
    seeds_needed: int | None  # per group, for 80% power at the observed difference

    @property
    def detected(self) -> bool:
        """Whether the interval excludes zero (the only case that earns a verdict)."""
        return self.low is not None and (self.low > 0 or self.high < 0)


def welch(a: Sequence[float], b: Sequence[float], name_a: str = "a", name_b: str = "b",
          level: float = LEVEL) -> Difference:
    xa, xb = [float(v) for v in a], [float(v) for v in b]
    na, nb = len(xa), len(xb)
    if na < 2 or nb < 2:
        diff = statistics.fmean(xa) - statistics.fmean(xb) if na and nb else None
        return Difference(name_a, name_b, na, nb, diff, None, None, None, None)
    va, vb = statistics.variance(xa), statistics.variance(xb)
    diff = statistics.fmean(xa) - statistics.fmean(xb)
    se2 = va / na + vb / nb
    if se2 == 0:  # identical replicates in both groups: the difference is exact
        return Difference(name_a, name_b, na, nb, diff, diff, diff, math.inf, None)
    df = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    half = _t(df, level) * math.sqrt(se2)
    return Difference(name_a, name_b, na, nb, diff, diff - half, diff + half, df,
                      seeds_needed(va ** 0.5, vb ** 0.5, diff, level))


def seeds_needed(std_a: float, std_b: float, diff: float, level: float = LEVEL,
                 power: float = POWER) -> int | None:
    """Replicates per group to detect ``diff`` (see the module docstring); None for diff 0."""
    if diff == 0:
        return None
    z = _z(0.5 + level / 2) + _z(power)
    return max(2, math.ceil(z * z * (std_a ** 2 + std_b ** 2) / diff ** 2))


def verdict(d: Difference, better: str = "higher", unit: str = "", scale: float = 1.0) -> str:
    """Words for a comparison: which is better only when the interval excludes zero."""
    if d.diff is None:
        return f"{d.a} vs {d.b}: no replicates to compare"
    if d.low is None:
        return (f"{d.a} vs {d.b}: too few replicates for an interval ({d.n_a} and {d.n_b}; "
                f"needs 2 each)")
    span = f"{d.diff * scale:+.2f}{unit} (95% CI {d.low * scale:+.2f}{unit} to {d.high * scale:+.2f}{unit})"
    n = min(d.n_a, d.n_b)
    if d.detected:
        winner = d.a if (d.diff > 0) == (better == "higher") else d.b
        return f"{winner} is better: {d.a} - {d.b} = {span}, {n} seeds each"
    if d.seeds_needed is None:
        need = "the observed difference is zero"
    elif d.seeds_needed <= n:  # z quantiles understate t quantiles at a handful of seeds
        need = (f"the normal approximation asks for {d.seeds_needed} seeds per group, no more "
                f"than were run: it is optimistic at so few seeds, so run more")
    else:
        need = f"about {d.seeds_needed} seeds per group would be needed to detect a difference this size"
    return f"no detectable difference with {n} seeds: {d.a} - {d.b} = {span}; {need}"
