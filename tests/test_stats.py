"""qspec.measure.stats against scipy (a test dependency only) and hand-computed values."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sp

from qspec.measure.stats import mean_se, paired_delta, ratio_interval, t975, t_interval, wilson


def test_wilson_known_values():
    # z^2 / (n + z^2) with z = 1.96, n = 10: the upper end at 0 successes
    z2 = 1.959963984540054**2
    assert wilson(0, 10) == pytest.approx((0.0, z2 / (10 + z2)), abs=1e-12)
    assert wilson(10, 10) == pytest.approx((10 / (10 + z2), 1.0), abs=1e-12)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    for k, n in [(0, 10), (5, 10), (10, 10), (3, 7), (97, 100), (1, 1)]:
        ci = sp.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    with pytest.raises(ValueError):
        wilson(0, 0)


def test_t_quantile_against_scipy():
    for df in range(1, 31):  # the table, three decimals
        assert t975(df) == pytest.approx(sp.t.ppf(0.975, df), abs=6e-4)
    for df in (31, 35, 50, 100, 1000, 10**6):  # the expansion beyond
        assert t975(df) == pytest.approx(sp.t.ppf(0.975, df), rel=1e-5)
    # no step at the end of the table
    assert t975(30) - t975(31) < 0.005


def test_mean_se_and_t_interval_against_scipy():
    xs = [0.3, -1.2, 2.5, 0.7, 0.1]
    mean, se = mean_se(xs)
    assert mean == pytest.approx(sum(xs) / 5) and se == pytest.approx(sp.sem(xs))
    m, low, high = t_interval(xs)
    lo, hi = sp.t.interval(0.95, len(xs) - 1, loc=mean, scale=sp.sem(xs))
    assert (m, low, high) == pytest.approx((mean, lo, hi), rel=1e-3)
    assert t_interval([1.5]) == (1.5, None, None)
    assert t_interval([]) == (None, None, None)
    assert t_interval(x for x in xs) == (m, low, high)


def test_ratio_interval_is_t_on_log_ratios():
    ratios = [1.8, 2.1, 1.95, 2.4]
    logs = [math.log(r) for r in ratios]
    lo, hi = sp.t.interval(0.95, 3, loc=sum(logs) / 4, scale=sp.sem(logs))
    g, low, high = ratio_interval(ratios)
    assert g == pytest.approx(math.prod(ratios) ** 0.25)
    assert (low, high) == pytest.approx((math.exp(lo), math.exp(hi)), rel=1e-3)
    assert ratio_interval([2.0]) == (pytest.approx(2.0), None, None)
    assert ratio_interval([]) == (None, None, None)


def _scores(worse: int, n: int = 20, better: int = 0) -> tuple[dict, dict]:
    """Reference right on every doc; the variant wrong on `worse`, and `better` docs swapped."""
    ref = {str(i): 1.0 for i in range(n)}
    var = {str(i): 0.0 if i < worse else 1.0 for i in range(n)}
    for i in range(worse, worse + better):
        ref[str(i)], var[str(i)] = 0.0, 1.0
    return var, ref


def test_paired_delta_one_doc_worse_is_not_significant():
    var, ref = _scores(worse=1)
    d = paired_delta(var, ref, higher_is_better=True)
    assert d["n"] == 20 and d["worse"] == 1 and d["better"] == 0
    assert d["delta_mean"] == pytest.approx(-0.05)
    assert d["delta_se"] == pytest.approx(sp.sem([-1.0] + [0.0] * 19))
    low, high = d["ci95"]
    assert low < 0 < high
    assert d["significant_drop"] is False


def test_paired_delta_real_drop_is_significant():
    var, ref = _scores(worse=10)
    d = paired_delta(var, ref, higher_is_better=True)
    deltas = [-1.0] * 10 + [0.0] * 10
    lo, hi = sp.t.interval(0.95, 19, loc=-0.5, scale=sp.sem(deltas))
    assert d["delta_mean"] == pytest.approx(-0.5)
    assert d["ci95"] == pytest.approx([lo, hi], rel=1e-3)
    assert d["sign_test_p"] == pytest.approx(sp.binomtest(0, 10).pvalue)
    assert d["significant_drop"] is True


def test_paired_delta_needs_the_sign_test_too():
    # 4 of 20 worse, none better: the t interval lies below 0, the exact sign test p = 0.125
    var, ref = _scores(worse=4)
    d = paired_delta(var, ref, higher_is_better=True)
    assert d["ci95"][1] < 0
    assert d["sign_test_p"] == pytest.approx(0.125)
    assert d["significant_drop"] is False
    # gains offset losses: no drop
    var, ref = _scores(worse=6, better=6)
    d = paired_delta(var, ref, higher_is_better=True)
    assert d["delta_mean"] == 0 and d["significant_drop"] is False


def test_paired_delta_lower_is_better_flips_the_sign():
    # a perplexity-like metric: the variant's values are higher, so it is worse
    ref = {i: 10.0 + i % 3 for i in range(20)}
    var = {i: v + 1.0 + 0.1 * (i % 2) for i, v in ref.items()}
    down = paired_delta(var, ref, higher_is_better=False)
    assert down["delta_mean"] == pytest.approx(-1.05)
    assert down["worse"] == 20 and down["significant_drop"] is True
    up = paired_delta(var, ref, higher_is_better=True)
    assert up["delta_mean"] == pytest.approx(1.05) and up["significant_drop"] is False
    assert up["ci95"] == pytest.approx([-x for x in reversed(down["ci95"])])
    unknown = paired_delta(var, ref, higher_is_better=None)
    assert unknown["delta_mean"] == pytest.approx(1.05) and unknown["significant_drop"] is None


def test_paired_delta_uses_the_docs_both_have():
    d = paired_delta({"a": 1.0, "b": 0.0, "c": 1.0}, {"b": 1.0, "c": 1.0, "d": 0.0}, True)
    assert d["n"] == 2 and d["delta_mean"] == pytest.approx(-0.5)
    one = paired_delta({"a": 0.0}, {"a": 1.0}, True)
    assert one["n"] == 1 and one["ci95"] is None and one["significant_drop"] is False
    none = paired_delta({}, {"a": 1.0}, True)
    assert none["n"] == 0 and none["delta_mean"] is None and none["significant_drop"] is False
