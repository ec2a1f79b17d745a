"""Paired ratios with bootstrap intervals: how the benchmarks say whether a target is met beyond noise."""

from __future__ import annotations

import random
import statistics


def paired_ratio(
    numerator: list[float], denominator: list[float], resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """The median of the per-repetition ratios ``numerator[i] / denominator[i]`` and the 2.5th and
    97.5th percentiles of that median over ``resamples`` bootstrap resamples of the repetitions.

    Why per repetition: the two variants of a repetition run back to back, so a slow drift of a shared
    machine's load slows both alike and cancels in their ratio, where a ratio of medians keeps it."""
    ratios = [n / d for n, d in zip(numerator, denominator, strict=True)]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def format_interval(ratio: tuple[float, float, float]) -> str:
    """``median (low-high)`` of a :func:`paired_ratio`."""
    return f"{ratio[0]:.3f} ({ratio[1]:.3f}-{ratio[2]:.3f})"
