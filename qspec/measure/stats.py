"""Intervals for the figures qspec prints: proportions, means, ratios of paired timings and
paired per-document deltas of task outcomes.

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
    """The 0.975 quantile of Student's t (two-sided 95%).

    1..30 degrees of freedom from the table; beyond, the Cornish-Fisher expansion around the
    normal quantile (relative error < 1e-6 there), so the interval does not shrink 4% in one step
    from 30 to 31 degrees of freedom as it would jumping to the normal's 1.96.
    """
    if df < 1:
        raise ValueError("need at least one degree of freedom")
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = Z95, float(df)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
    )


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion: sane at 0, 1 and small n, unlike mean +- z*se."""
    if n <= 0:
        raise ValueError("a proportion needs n > 0")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(s1: int, n1: int, s2: int, n2: int) -> tuple[float, float, float]:
    """p1 - p2 of two independent proportions and Newcombe's 95% interval from their Wilson
    intervals (method 10): sane near 0 and 1, unlike p +- z * se."""
    p1, p2 = s1 / n1, s2 / n2
    l1, u1 = wilson(s1, n1)
    l2, u2 = wilson(s2, n2)
    d = p1 - p2
    return d, d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)


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
    mean, low, high = t_interval([math.log(r) for r in ratios if r > 0])
    if mean is None:
        return None, None, None
    if low is None:
        return math.exp(mean), None, None
    return math.exp(mean), math.exp(low), math.exp(high)


def t_interval(values) -> tuple[float | None, float | None, float | None]:
    """Mean and its 95% interval, mean +- t(n-1) * se: small samples get Student's width.

    One value has no interval: (value, None, None); none: (None, None, None).
    """
    xs = [float(v) for v in values]
    mean, se = mean_se(xs)
    if se is None:
        return mean, None, None
    half = t975(len(xs) - 1) * se
    return mean, mean - half, mean + half


def _sign_test_p(worse: int, better: int) -> float:
    """Two-sided exact sign test (binomial, p = 1/2) on the documents that changed."""
    n = worse + better
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(worse, better) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_delta(
    variant_scores: dict, reference_scores: dict, higher_is_better: bool | None
) -> dict:
    """Per-document paired delta of a task metric, variant minus reference, on the documents
    both have; signed so that negative means worse (higher_is_better=False flips it).

    Pairing removes the between-document spread that an unpaired comparison of two accuracies
    carries, so a real drop shows with few documents. significant_drop needs both the 95%
    t interval of the mean delta below 0 and an exact two-sided sign test at 5% on the
    documents that changed: with 0/1 outcomes and few changed documents the t interval alone
    is over-confident (4 of 20 documents worse and none better puts it below 0, while the
    sign test gives p = 0.125). higher_is_better=None (direction unknown): the delta is
    variant minus reference and significant_drop is None.
    """
    docs = sorted(set(variant_scores) & set(reference_scores), key=str)
    sign = -1.0 if higher_is_better is False else 1.0
    deltas = [sign * (float(variant_scores[d]) - float(reference_scores[d])) for d in docs]
    mean, low, high = t_interval(deltas)
    _, se = mean_se(deltas)
    worse = sum(d < 0 for d in deltas)
    better = sum(d > 0 for d in deltas)
    p = _sign_test_p(worse, better)
    drop = high is not None and high < 0 and p < 0.05
    return {
        "n": len(deltas),
        "delta_mean": mean,
        "delta_se": se,
        "ci95": [low, high] if low is not None else None,
        "worse": worse,
        "better": better,
        "sign_test_p": p,
        "significant_drop": None if higher_is_better is None else drop,
    }


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no data."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def quantiles(values: list[float], qs: tuple[int, ...]) -> dict:
    """{"p<q>": ..., "n": ...} of the values (linear interpolation), for the record parts."""
    return {**{f"p{q}": percentile(values, q) for q in qs}, "n": len(values)}


def spread_of(values: list[float | None]) -> dict | None:
    """p10/p50/p90 across requests (prompts): how much one request's figure can differ."""
    xs = [v for v in values if v is not None]
    return quantiles(xs, (10, 50, 90)) if xs else None
