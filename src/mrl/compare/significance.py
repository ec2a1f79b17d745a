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

import numpy as np
from scipy import stats

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


def welch(a: Sequence[float], b: Sequence[float], delta: float = 0.0) -> Welch | None:
    """Welch's t-test of ``mean(a) - mean(b) == delta`` (scipy's ``ttest_ind(equal_var=False)``); None when
    either side has fewer than 2 values (no variance to compare with). Without any spread (both variances
    0, where scipy gives nan) a gap is either exactly ``delta`` (p = 1) or infinitely many standard errors
    from it (p = 0)."""
    if len(a) < 2 or len(b) < 2:
        return None
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    gap = float(x.mean() - y.mean())
    se = math.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
    if se == 0.0:
        same = gap == delta
        return Welch(
            gap, 0.0, 0.0 if same else math.copysign(math.inf, gap - delta), math.nan, float(same), delta
        )
    result = stats.ttest_ind(x - delta, y, equal_var=False)
    return Welch(gap, se, float(result.statistic), float(result.df), float(result.pvalue), delta)


def exceeds_noise(test: Welch, alpha: float = ALPHA) -> bool:
    """Whether the gap differs from ``test.delta`` by more than the seeds' noise at level ``alpha``."""
    return test.p < alpha


def p_value(p: float) -> str:
    """``p=0.13`` with two decimals, more where they would round a small p to 0.00 (``p=0.004``,
    ``p<0.001``)."""
    if p < 0.001:
        return "p<0.001"
    return f"p={p:.3f}" if p < 0.01 else f"p={p:.2f}"
