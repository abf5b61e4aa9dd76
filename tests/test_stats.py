"""unlearning_audit.stats against independent references (scipy, sklearn, hand-worked values)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from unlearning_audit.stats import (
    auroc,
    benjamini_hochberg,
    bootstrap_statistic,
    bounds,
    cluster_means,
    facts_needed,
    holm,
    mcnemar,
    p_above,
    p_below,
    sign_flip_test,
    sign_test,
    spearman,
    wilson,
)

# ---------------------------------------------------------------------------- cluster_means


def test_cluster_means_iid_matches_mean_and_analytic_standard_error():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=200)
    draws = cluster_means(x, None, resamples=20_000, seed=7)
    assert draws.shape == (20_000,)
    # The bootstrap of a mean resamples the empirical distribution: its sd is the plug-in
    # standard error sqrt((n - 1) / n) * s / sqrt(n).
    n = x.size
    se = x.std(ddof=1) / math.sqrt(n)
    assert abs(draws.mean() - x.mean()) < 4 * se / math.sqrt(20_000)
    assert draws.std() == pytest.approx(se * math.sqrt((n - 1) / n), rel=0.05)
    assert draws.std() == pytest.approx(se, rel=0.05)


def test_cluster_means_identical_rows_in_a_group_resample_group_means():
    rng = np.random.default_rng(2)
    group_means = rng.normal(size=40)
    sizes = np.full(40, 4)
    values = np.repeat(group_means, sizes)
    labels = [f"author-{g}" for g in np.repeat(np.arange(40), sizes)]
    draws = cluster_means(values, labels, resamples=20_000, seed=3)
    # Equal sizes: a draw is the mean of 40 group means drawn with replacement, whose sd is
    # the population sd of the group means over sqrt(G).
    expected = group_means.std(ddof=0) / math.sqrt(40)
    assert draws.std() == pytest.approx(expected, rel=0.05)
    assert draws.mean() == pytest.approx(group_means.mean(), abs=4 * expected / math.sqrt(20_000))
    # Far wider than the iid bootstrap, which would treat the 160 rows as independent.
    iid = cluster_means(values, None, resamples=20_000, seed=3)
    assert draws.std() > 1.7 * iid.std()


def test_cluster_means_weights_clusters_by_their_rows():
    # Two clusters: a (1 row, value 0) and b (3 rows, value 1). Draws: {a, a} -> 0,
    # {a, b} -> 3/4 and {b, b} -> 1, with probabilities 1/4, 1/2, 1/4.
    values = np.array([0.0, 1.0, 1.0, 1.0])
    draws = cluster_means(values, ["a", "b", "b", "b"], resamples=20_000, seed=0)
    support, counts = np.unique(draws, return_counts=True)
    np.testing.assert_allclose(support, [0.0, 0.75, 1.0])
    np.testing.assert_allclose(counts / 20_000, [0.25, 0.5, 0.25], atol=0.02)


def test_cluster_means_one_group_is_constant():
    values = np.array([0.1, 0.4, 0.9, 0.3])
    draws = cluster_means(values, ["x"] * 4, resamples=500, seed=0)
    np.testing.assert_allclose(draws, values.mean(), rtol=0, atol=1e-15)


def test_cluster_means_two_dimensional_matches_columns_and_is_deterministic():
    rng = np.random.default_rng(4)
    values = rng.random((60, 3))
    groups = list(rng.integers(0, 12, size=60))
    both = cluster_means(values, groups, resamples=300, seed=11)
    assert both.shape == (300, 3)
    for j in range(3):
        np.testing.assert_array_equal(both[:, j], cluster_means(values[:, j], groups, 300, 11))
    np.testing.assert_array_equal(both, cluster_means(values, groups, 300, 11))
    assert not np.array_equal(both, cluster_means(values, groups, 300, 12))


def test_cluster_means_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        cluster_means(np.array([0.0, np.nan]), None, 10, 0)
    with pytest.raises(ValueError, match="empty"):
        cluster_means(np.array([]), None, 10, 0)
    with pytest.raises(ValueError, match="labels"):
        cluster_means(np.zeros(3), ["a", "b"], 10, 0)
    with pytest.raises(ValueError, match="resamples"):
        cluster_means(np.zeros(3), None, 0, 0)
    with pytest.raises(ValueError, match="1-D or 2-D"):
        cluster_means(np.zeros((2, 2, 2)), None, 10, 0)


# ---------------------------------------------------------------------------- bounds, p-values


def test_bounds_are_numpy_quantiles():
    draws = np.random.default_rng(5).normal(size=1001)
    low, high = bounds(draws, 0.05)
    assert (low, high) == (np.quantile(draws, 0.05), np.quantile(draws, 0.95))
    assert bounds(np.arange(11.0), 0.1) == (1.0, 9.0)


@pytest.mark.parametrize("alpha", [0.0, 0.5, -0.1, 1.0])
def test_bounds_reject_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match="alpha"):
        bounds(np.arange(10.0), alpha)


def test_p_above_and_p_below_by_hand():
    draws = np.array([-0.2, 0.0, 0.1, 0.3, 0.5])
    # At or below 0.0: two draws -> (1 + 2) / 6; at or above 0.0: four -> (1 + 4) / 6.
    assert p_above(draws, 0.0) == pytest.approx(3 / 6)
    assert p_below(draws, 0.0) == pytest.approx(5 / 6)
    assert p_above(draws, -1.0) == pytest.approx(1 / 6)
    assert p_below(draws, 0.4) == pytest.approx(2 / 6)
    assert p_below(draws, 1.0) == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="empty"):
        p_above(np.array([]), 0.0)


# ---------------------------------------------------------------------------- exact tests


@pytest.mark.parametrize(
    ("k", "m"),
    [
        *[(0, 0), (0, 1), (1, 1), (0, 5), (3, 5), (5, 5), (10, 20), (11, 20), (15, 20)],
        *[(14, 30), (50, 101), (70, 101), (2500, 5000), (2560, 5000), (2700, 5000)],
        *[(2300, 5000), (5000, 5000), (50_000, 100_000), (50_700, 100_000), (49_000, 100_000)],
    ],
)
def test_sign_test_is_the_exact_binomial_tail(k, m):
    differences = np.r_[np.full(k, 0.5), np.full(m - k, -2.0), np.zeros(7)]
    np.random.default_rng(k + m).shuffle(differences)
    reference = sps.binomtest(k, m, 0.5, alternative="greater").pvalue if m else 1.0
    assert sign_test(differences) == pytest.approx(reference, rel=1e-9, abs=1e-300)


def test_sign_test_edge_cases():
    assert sign_test(np.array([])) == 1.0
    assert sign_test(np.zeros(4)) == 1.0
    assert sign_test(np.array([1.0, 1.0, 1.0])) == 0.125
    with pytest.raises(ValueError, match="NaN"):
        sign_test(np.array([1.0, np.nan]))


def test_mcnemar_by_hand():
    # 6 pairs 0 -> 1, 1 pair 1 -> 0, 5 concordant: P(Bin(7, 1/2) >= 6) = (7 + 1) / 128.
    before = np.array([0] * 6 + [1] + [1, 1, 0, 0, 0], dtype=bool)
    after = np.array([1] * 6 + [0] + [1, 1, 0, 0, 0], dtype=bool)
    assert mcnemar(before, after) == pytest.approx(8 / 128)
    # The other direction: P(Bin(7, 1/2) >= 1) = 127 / 128.
    assert mcnemar(after, before) == pytest.approx(127 / 128)
    assert mcnemar(before, before) == 1.0
    assert mcnemar(before.astype(int), after.astype(int)) == pytest.approx(8 / 128)
    with pytest.raises(ValueError, match="length"):
        mcnemar(before, after[:-1])
    with pytest.raises(ValueError, match="binary"):
        mcnemar(np.array([0, 2]), np.array([1, 1]))


# ---------------------------------------------------------------------------- multiplicity


def _holm_brute_force(p: list[float]) -> list[float]:
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted = [0.0] * m
    for i in range(m):
        adjusted[order[i]] = max(min(1.0, (m - j) * p[order[j]]) for j in range(i + 1))
    return adjusted


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.03, 0.5 -> 4 * 0.01, 3 * 0.02, max(0.06, 2 * 0.03), max(0.06, 0.5)
    assert holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    assert holm([0.4, 0.3]) == pytest.approx([0.6, 0.6])
    assert holm([0.9, 0.8]) == [1.0, 1.0]
    assert holm([]) == []


def test_benjamini_hochberg_by_hand():
    # sorted 0.01, 0.02, 0.03, 0.5 -> min over the rest of 4 p / rank: 0.04, 0.04, 0.04, 0.5
    assert benjamini_hochberg([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.04, 0.04, 0.5, 0.04])
    assert benjamini_hochberg([0.01, 0.04]) == pytest.approx([0.02, 0.04])
    assert benjamini_hochberg([]) == []


@pytest.mark.parametrize("seed", range(5))
def test_multiplicity_against_references(seed):
    rng = np.random.default_rng(seed)
    p = rng.random(25) ** 3
    p[:3] = p[3]  # ties
    p[-1] = 1.0
    np.testing.assert_allclose(holm(p.tolist()), _holm_brute_force(p.tolist()), rtol=1e-12)
    np.testing.assert_allclose(
        benjamini_hochberg(p.tolist()), sps.false_discovery_control(p, method="bh"), rtol=1e-12
    )


def test_multiplicity_rejects_bad_pvalues():
    for function in (holm, benjamini_hochberg):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            function([0.1, 1.5])
        with pytest.raises(ValueError, match="NaN"):
            function([0.1, float("nan")])


# ---------------------------------------------------------------------------- ranks


@pytest.mark.parametrize("seed", range(4))
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(80) < 0.4
    scores = np.round(rng.normal(size=80) + labels, 1)  # rounding makes many ties
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)
    assert auroc(scores, labels.astype(int)) == pytest.approx(roc_auc_score(labels, scores))


def test_auroc_hand_cases():
    assert auroc(np.array([0.9, 0.8, 0.1]), np.array([1, 1, 0])) == 1.0
    assert auroc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1])))
    with pytest.raises(ValueError, match="length"):
        auroc(np.array([0.1, 0.2]), np.array([1]))


@pytest.mark.parametrize("seed", range(4))
def test_spearman_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, size=50).astype(float)
    y = x + rng.integers(0, 4, size=50)
    assert spearman(x, y) == pytest.approx(sps.spearmanr(x, y).statistic, rel=1e-12)


def test_spearman_constant_is_nan():
    assert math.isnan(spearman(np.ones(5), np.arange(5.0)))
    assert math.isnan(spearman(np.arange(5.0), np.full(5, 2.0)))
    assert spearman(np.arange(5.0), -np.arange(5.0)) == pytest.approx(-1.0)


# ---------------------------------------------------------------------------- bootstrap_statistic


def test_bootstrap_statistic_interval_contains_value():
    rng = np.random.default_rng(8)
    x = rng.normal(size=60)
    y = x + rng.normal(scale=0.5, size=60)
    value, low, high = bootstrap_statistic(spearman, [x, y], 0.05, 300, seed=1)
    assert value == pytest.approx(sps.spearmanr(x, y).statistic)
    assert 0.5 < low < value < high <= 1.0
    again = bootstrap_statistic(spearman, [x, y], 0.05, 300, seed=1)
    assert again == (value, low, high)


def test_bootstrap_statistic_drops_nan_resamples():
    # 1 positive among 8: a resample misses it with chance (7/8)^8 ~ 0.34, and its AUROC is NaN.
    scores = np.arange(8.0)
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 1])
    value, low, high = bootstrap_statistic(auroc, [scores, labels], 0.05, 200, seed=0)
    assert value == 1.0
    assert (low, high) == (1.0, 1.0)  # the non-NaN resamples all separate perfectly
    # Every resample NaN: a single class.
    value, low, high = bootstrap_statistic(auroc, [scores, np.zeros(8)], 0.05, 50, seed=0)
    assert math.isnan(value) and math.isnan(low) and math.isnan(high)


def test_bootstrap_statistic_rejects_unpaired_arrays():
    with pytest.raises(ValueError, match="rows"):
        bootstrap_statistic(spearman, [np.arange(5.0), np.arange(4.0)], 0.05, 10, seed=0)


# ---------------------------------------------------------------------------- facts_needed


def test_facts_needed_iid_by_hand():
    # 100 values, half 0 and half 1: mean 1/2, sum of squared deviations 25, se = 5 / 100.
    # z(0.95) = 1.6448536...: n' = 100 * (1.6448536 * 0.05 / 0.02)^2 = 1690.95... -> 1691.
    values = np.r_[np.zeros(50), np.ones(50)]
    assert facts_needed(values, None, gap=0.02, alpha=0.05) == 1691
    # A gap the current n already bridges: z * se = 0.0822 < 0.1 -> 100 * 0.822^2 = 67.6 -> 68.
    assert facts_needed(values, None, gap=0.1, alpha=0.05) == 68


def test_facts_needed_clusters_by_hand():
    # Two groups of 2 rows: sums 0 and 2, mean 1/2, residuals -1 and +1, se = sqrt(2) / 4.
    # z(0.975) = 1.959964: n' = 4 * (1.959964 * 0.353553 / 0.5)^2 = 7.68 -> 8.
    values = np.array([0.0, 0.0, 1.0, 1.0])
    assert facts_needed(values, ["a", "a", "b", "b"], gap=0.5, alpha=0.025) == 8


def test_facts_needed_undefined():
    values = np.r_[np.zeros(5), np.ones(5)]
    assert facts_needed(values, None, gap=0.0, alpha=0.05) is None
    assert facts_needed(values, None, gap=-0.1, alpha=0.05) is None
    assert facts_needed(np.full(10, 0.1), None, gap=0.1, alpha=0.05) is None
    with pytest.raises(ValueError, match="alpha"):
        facts_needed(values, None, gap=0.1, alpha=0.7)


# ---------------------------------------------------------------------------- calibration


def _null_rejection_rate(shift: float) -> float:
    """Share of 400 null data sets where the one-sided cluster bootstrap rejects at 0.05.

    30 clusters (authors) x 5 paired Bernoulli differences d = a - b. Cluster g has a base rate
    r_g and a deviation e_g ~ U(-shift, shift): a at r_g + e_g, b at r_g - e_g, so the mean of d
    is 0 while, for shift > 0, the differences within a cluster move together (resampling rows
    as if independent then rejects about 11% of these data sets instead of 5%).
    """
    rng = np.random.default_rng(2024)
    n_sets, n_groups, rows = 400, 30, 5
    groups = np.repeat(np.arange(n_groups), rows)
    base = rng.uniform(0.35, 0.65, size=(n_sets, n_groups))
    deviation = rng.uniform(-shift, shift, size=(n_sets, n_groups))
    rate_a = (base + deviation).repeat(rows, axis=1)
    rate_b = (base - deviation).repeat(rows, axis=1)
    differences = (rng.random(rate_a.shape) < rate_a).astype(float) - (
        rng.random(rate_b.shape) < rate_b
    )
    rejected = sum(
        p_above(cluster_means(d, groups, resamples=1000, seed=i), 0.0) < 0.05
        for i, d in enumerate(differences)
    )
    return rejected / n_sets


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_one_sided_cluster_bootstrap_keeps_its_level_under_the_null(shift):
    # At most alpha plus simulation slack (the sd of a rate near 0.05 over 400 sets is 0.011).
    assert _null_rejection_rate(shift) <= 0.07


def test_sign_flip_test_matches_full_enumeration():
    """With 10 clusters every one of the 2^10 sign patterns can be listed: the Monte Carlo
    p-value is within its error of the exact share of patterns at least as large."""
    import itertools

    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(10), 3)
    d = rng.normal(0.3, 1.0, size=30)
    sums = np.bincount(groups, weights=d)
    patterns = np.array(list(itertools.product((-1.0, 1.0), repeat=10)))
    exact = np.mean(patterns @ sums >= sums.sum() - 1e-12)
    p = sign_flip_test(d, groups, resamples=20_000, seed=0)
    assert p == pytest.approx(exact, abs=4 * np.sqrt(exact * (1 - exact) / 20_000) + 1e-4)
    assert sign_flip_test(-np.abs(d) - 1, groups, 1000, 0) == pytest.approx(1.0)


def test_sign_flip_test_null_rate():
    rng = np.random.default_rng(6)
    groups = np.repeat(np.arange(20), 5)
    rejections = 0
    for _ in range(300):
        rates = np.repeat(rng.uniform(0, 0.6, 20), 5)
        d = (rng.random(100) < rates).astype(float) - (rng.random(100) < rates)
        rejections += sign_flip_test(d, groups, 500, int(rng.integers(1 << 30))) < 0.05
    assert rejections / 300 <= 0.07


# ---------------------------------------------------------------------------- wilson


@pytest.mark.parametrize(("k", "n"), [(0, 5), (3, 5), (5, 5), (7, 18), (15, 18), (1, 1)])
def test_wilson_matches_scipy(k, n):
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=0.9, method="wilson")
    share, lower, upper = wilson(k, n, alpha=0.05)
    assert share == k / n
    assert lower == pytest.approx(ci.low, abs=1e-12)
    assert upper == pytest.approx(ci.high, abs=1e-12)


def test_wilson_by_hand_and_edges():
    # 2 of 4, z = 1.6449: centre 0.5, half-width z / (1 + z^2/4) * sqrt(1/16 + z^2/64) = 0.3176
    share, lower, upper = wilson(2, 4, alpha=0.05)
    assert (share, lower, upper) == pytest.approx((0.5, 0.1824, 0.8176), abs=1e-4)
    assert wilson(0, 7, alpha=0.05)[1] == 0.0 and wilson(7, 7, alpha=0.05)[2] == 1.0
    assert all(math.isnan(v) for v in wilson(0, 0, alpha=0.05))
    with pytest.raises(ValueError, match=r"0\.\.n"):
        wilson(3, 2, alpha=0.05)
