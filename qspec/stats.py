"""Intervals for the figures qspec prints: proportions, means and ratios of paired timings.

Torch-free and scipy-free (scipy is a test dependency only), so the report can use it.
"""

from __future__ import annotations

import math
import statistics

Z95 = 1.959963984540054
# Student's t, two-sided 95% (0.975 quantile), for 1..30 degrees of freedom
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t; beyond 30 degrees of freedom, the normal's."""
    if df < 1:
        raise ValueError("need at least one degree of freedom")
    return _T975[df - 1] if df <= len(_T975) else Z95


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion: sane at 0, 1 and small n, unlike mean +- z*se."""
    if n <= 0:
        raise ValueError("a proportion needs n > 0")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_se(values) -> tuple[float | None, float | None]:
    """Mean and standard error of the mean (None where there are too few values)."""
    xs = [float(v) for v in values]
    if not xs:
        return None, None
    mean = statistics.fmean(xs)
    return mean, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None)


def ratio_interval(ratios) -> tuple[float | None, float | None, float | None]:
    """Geometric mean of paired ratios and its 95% interval (t on the log ratios).

    Ratios of timings are skewed; their logs are close to symmetric, and a speedup of 2x
    and one of 0.5x then weigh the same. One ratio has no interval: (ratio, None, None).
    """
    logs = [math.log(r) for r in ratios if r > 0]
    if not logs:
        return None, None, None
    mean, se = mean_se(logs)
    if se is None:
        return math.exp(mean), None, None
    half = t975(len(logs) - 1) * se
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)
