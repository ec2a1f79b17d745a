"""Is a gap between two methods larger than their seed-to-seed noise? Welch's unequal-variance t-test.

A comparison table averages a few seeds per method; two means 3 points apart can still be the same
method within noise when each seed's number varies by 10. Welch's test compares the gap of the means
with its standard error ``sqrt(var_a / n_a + var_b / n_b)`` (sample variances, no equal-variance
assumption) on a t distribution with the Welch-Satterthwaite degrees of freedom.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.special import stdtr

# The usual two-sided level below which a gap is called larger than the seeds' noise.
ALPHA = 0.05


@dataclass(frozen=True)
class Welch:
    """``mean(a) - mean(b)``, its standard error, Welch's t against ``delta`` (the difference assumed
    under the null hypothesis), the Welch-Satterthwaite degrees of freedom and the two-sided p-value."""

    gap: float
    se: float
    t: float
    df: float
    p: float
    delta: float = 0.0


def _mean_var(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def welch(a: Sequence[float], b: Sequence[float], delta: float = 0.0) -> Welch | None:
    """Welch's t-test of ``mean(a) - mean(b) == delta``; None when either side has fewer than 2 values
    (no variance to compare with). Without any spread (both variances 0) a gap is either exactly
    ``delta`` (p = 1) or infinitely many standard errors from it (p = 0)."""
    if len(a) < 2 or len(b) < 2:
        return None
    (mean_a, var_a), (mean_b, var_b) = _mean_var(a), _mean_var(b)
    gap = mean_a - mean_b
    qa, qb = var_a / len(a), var_b / len(b)
    se = math.sqrt(qa + qb)
    if se == 0.0:
        same = gap == delta
        return Welch(
            gap, 0.0, 0.0 if same else math.copysign(math.inf, gap - delta), math.nan, float(same), delta
        )
    t = (gap - delta) / se
    df = (qa + qb) ** 2 / (qa**2 / (len(a) - 1) + qb**2 / (len(b) - 1))
    # two-sided: twice the t distribution's tail beyond |t| (stdtr is its CDF)
    p = 2.0 * float(stdtr(df, -abs(t)))
    return Welch(gap, se, t, df, p, delta)


def exceeds_noise(test: Welch, alpha: float = ALPHA) -> bool:
    """Whether the gap differs from ``test.delta`` by more than the seeds' noise at level ``alpha``."""
    return test.p < alpha


def p_value(p: float) -> str:
    """``p=0.13`` with two decimals, more where they would round a small p to 0.00 (``p=0.004``,
    ``p<0.001``)."""
    if p < 0.001:
        return "p<0.001"
    return f"p={p:.3f}" if p < 0.01 else f"p={p:.2f}"
