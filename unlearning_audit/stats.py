"""Statistics behind the verdict: cluster bootstrap, exact paired tests, multiplicity, ranks.

A verdict is a claim about a few dozen to a few thousand facts that are not independent: facts
about one author rise and fall together. So intervals come from a cluster bootstrap over groups
(``cluster_means``, ``bounds``, ``p_above``, ``p_below``), binary outcomes also get an exact paired
test (``sign_test``, ``mcnemar``), several looks at one question are Holm-adjusted (``holm``) and
a study's many calls Benjamini-Hochberg-adjusted (``benjamini_hochberg``). Whether a
representation metric predicts recovery is measured by ``auroc`` and ``spearman`` with percentile
intervals (``bootstrap_statistic``). ``facts_needed`` says roughly how many facts would settle an
inconclusive call.

Plain numpy, no Python loop over bootstrap resamples (except ``bootstrap_statistic``, which calls
an arbitrary statistic), deterministic for a seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from statistics import NormalDist

import numpy as np

# Most entries of one (resamples x groups) block of bootstrap counts, to bound memory; fixed, so
# the draws depend only on the seed, the number of groups and the number of resamples.
_BLOCK = 1 << 22
# Stop summing binomial coefficients once the rest is below 2^-_TAIL_BITS of the sum so far.
_TAIL_BITS = 80


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must lie strictly between 0 and 0.5, got {alpha}")
    return alpha


def _finite_1d(x: np.ndarray, name: str, allow_empty: bool = False) -> np.ndarray:
    """``x`` as a 1-D float array, refusing NaN or infinity (and, unless allowed, emptiness)."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not allow_empty and arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _group_codes(groups: Sequence[Hashable] | None, n: int) -> tuple[np.ndarray, int]:
    """Integer codes 0..G-1 of ``groups`` (in order of first appearance) and G.

    ``None`` makes every row its own group. A dict, not ``np.unique``, so that any hashable label
    works (mixed types included) and the order, hence the draws, does not depend on sorting.
    """
    if groups is None:
        return np.arange(n, dtype=np.intp), n
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} labels for {n} rows")
    index: dict[Hashable, int] = {}
    codes = np.fromiter((index.setdefault(g, len(index)) for g in groups), np.intp, count=n)
    return codes, len(index)


def cluster_means(
    values: np.ndarray, groups: Sequence | None, resamples: int, seed: int
) -> np.ndarray:
    """Cluster-bootstrap draws of the column means of ``values``.

    Facts in one group (e.g. one author) are correlated, so the group, not the row, is the unit
    resampled: each resample draws G clusters with replacement out of the G distinct groups
    (multinomial counts) and takes the mean over all rows of the drawn clusters (a cluster drawn
    twice counts twice), for each column.

    Parameters
    ----------
    values : array of shape (n,) or (n, k)
        Per-row scores or paired differences; NaN or infinity raises ValueError.
    groups : sequence of n hashable labels, or None
        The cluster of each row; None makes every row its own cluster (the iid bootstrap).
    resamples : int
        Number of bootstrap draws B (at least 1).
    seed : int
        Seed of ``numpy.random.default_rng``; the draws are a function of the seed, the number
        of groups and B, so the columns of a 2-D call equal 1-D calls on each column.

    Returns
    -------
    draws : array of shape (B,) for 1-D input, (B, k) for 2-D input.

    Vectorised: per-group sums and sizes, then counts (B x G) @ sums (G x k), in blocks of
    resamples to bound memory.
    """
    arr = np.asarray(values, dtype=float)
    if arr.ndim not in (1, 2):
        raise ValueError(f"values must be 1-D or 2-D, got shape {arr.shape}")
    n = arr.shape[0]
    if n == 0:
        raise ValueError("values is empty: no rows to resample")
    if not np.all(np.isfinite(arr)):
        raise ValueError("values contains NaN or infinite values")
    resamples = int(resamples)
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    matrix = arr.reshape(n, -1)
    codes, n_groups = _group_codes(groups, n)

    columns = range(matrix.shape[1])
    sums = np.stack(
        [np.bincount(codes, weights=matrix[:, j], minlength=n_groups) for j in columns], axis=1
    )
    sizes = np.bincount(codes, minlength=n_groups).astype(float)

    rng = np.random.default_rng(seed)
    pvals = np.full(n_groups, 1.0 / n_groups)
    block = max(1, _BLOCK // n_groups)
    out = np.empty((resamples, matrix.shape[1]))
    for start in range(0, resamples, block):
        stop = min(resamples, start + block)
        counts = rng.multinomial(n_groups, pvals, size=stop - start).astype(float)
        rows = counts @ sizes  # rows drawn per resample, >= G >= 1
        # One column at a time, so a column's draws do not depend on the other columns.
        for j in range(matrix.shape[1]):
            out[start:stop, j] = (counts @ sums[:, j]) / rows
    return out[:, 0] if arr.ndim == 1 else out


def bounds(draws: np.ndarray, alpha: float) -> tuple[float, float]:
    """The one-sided (1 - alpha) lower and upper bounds of a bootstrap distribution.

    They are its alpha and (1 - alpha) quantiles (numpy's default linear interpolation); together
    a (1 - 2 alpha) two-sided percentile interval. ``0 < alpha < 0.5``.
    """
    alpha = _check_alpha(alpha)
    arr = _finite_1d(draws, "draws")
    low, high = np.quantile(arr, [alpha, 1.0 - alpha])
    return float(low), float(high)


def p_above(draws: np.ndarray, margin: float) -> float:
    """Bootstrap p-value of H0: mean <= margin, against mean > margin.

    ``(1 + #{draws <= margin}) / (1 + B)``: the +1 counts the observed data as one draw, so the
    p-value is never 0 and the test is not anti-conservative at small B.
    """
    arr = _finite_1d(draws, "draws")
    return float((1 + np.count_nonzero(arr <= margin)) / (1 + arr.size))


def p_below(draws: np.ndarray, margin: float) -> float:
    """Bootstrap p-value of H0: mean >= margin, against mean < margin.

    ``(1 + #{draws >= margin}) / (1 + B)``, the mirror of ``p_above``.
    """
    arr = _finite_1d(draws, "draws")
    return float((1 + np.count_nonzero(arr >= margin)) / (1 + arr.size))


def _upper_tail_count(k: int, m: int) -> int:
    """sum_{i >= k} C(m, i) for k > (m - 1) / 2, in exact integers.

    From there on the terms fall, so the sum stops once the rest, at most (m - i) times the last
    term, is below 2^-80 of the sum: far below double precision.
    """
    term = math.comb(m, k)
    total = term
    for i in range(k, m):
        # bit lengths bound the rest by 2^(bits of (m - i) * term), so the check costs O(1)
        if term.bit_length() + (m - i).bit_length() < total.bit_length() - _TAIL_BITS:
            break
        term = term * (m - i) // (i + 1)  # C(m, i + 1), exact
        total += term
    return total


def _binomial_upper_tail(k: int, m: int) -> float:
    """P(Binomial(m, 1/2) >= k), exact to double precision for m into the hundreds of thousands.

    Integer arithmetic throughout (Python int / int rounds correctly); the smaller tail is the one
    summed: for k at or below the middle, 1 - P(X >= m - k + 1) by symmetry.
    """
    if k <= 0:
        return 1.0
    if k > m:
        return 0.0
    if 2 * k > m - 1:
        return _upper_tail_count(k, m) / (1 << m)
    whole = 1 << m
    return (whole - _upper_tail_count(m - k + 1, m)) / whole


def sign_flip_test(
    differences: np.ndarray, groups: Sequence[Hashable] | None, resamples: int, seed: int
) -> float:
    """Randomisation test of H0: paired differences are symmetric around 0 within each cluster,
    against a positive mean.

    Under H0 (the two arms exchangeable, fact by fact), flipping the sign of a whole cluster's
    differences leaves their distribution unchanged, so the share of random flips whose total is
    at least the observed total is an exact p-value, (1 + hits) / (1 + resamples), for the same
    statistic the bootstrap interval is on (the sum, hence the mean).
    """
    d = _finite_1d(np.asarray(differences, dtype=float), "differences")
    codes, n_groups = _group_codes(groups, d.size)
    sums = np.bincount(codes, weights=d, minlength=n_groups)
    flips = np.random.default_rng(seed).choice((-1.0, 1.0), size=(int(resamples), n_groups))
    totals = flips @ sums
    observed = sums.sum()
    hits = int(np.count_nonzero(totals >= observed - 1e-12 * max(1.0, abs(observed))))
    return (1 + hits) / (1 + int(resamples))


def sign_test(differences: np.ndarray) -> float:
    """Exact one-sided sign test of paired differences.

    H0: positive and negative differences are equally likely; alternative: more positives. Zeros
    are dropped (they say nothing about the direction); with no nonzero difference the p-value is
    1.0. ``p = P(Binomial(m, 1/2) >= k_plus)`` with m nonzero differences, k_plus of them
    positive, computed exactly (no normal approximation), so small sets get honest p-values.
    """
    arr = _finite_1d(differences, "differences", allow_empty=True)
    k_plus = int(np.count_nonzero(arr > 0))
    m = k_plus + int(np.count_nonzero(arr < 0))
    return float(_binomial_upper_tail(k_plus, m))


def _binary(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype != bool:
        if arr.size and not np.all(np.isin(arr, (0, 1))):
            raise ValueError(f"{name} must be binary (bool or 0/1)")
        arr = arr.astype(bool)
    return arr


def mcnemar(before: np.ndarray, after: np.ndarray) -> float:
    """Exact one-sided McNemar test on paired binary outcomes.

    H0: the discordant pairs split evenly; alternative: more 0 -> 1 than 1 -> 0 changes (e.g. a
    fact answered after relearning but not before). Equal to ``sign_test(after - before)``: only
    the discordant pairs count. ``before`` and ``after`` are bool (or 0/1) arrays of one length.
    """
    b = _binary(before, "before")
    a = _binary(after, "after")
    if a.shape != b.shape:
        raise ValueError(f"before and after differ in length: {b.size} != {a.size}")
    return sign_test(a.astype(np.int8) - b.astype(np.int8))


def _pvalues(pvalues: Sequence[float]) -> np.ndarray:
    arr = _finite_1d(np.asarray(pvalues, dtype=float), "pvalues", allow_empty=True)
    if np.any((arr < 0) | (arr > 1)):
        raise ValueError("pvalues must lie in [0, 1]")
    return arr


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in input order.

    Controls the family-wise error rate over a few looks at one question (e.g. the whole forget
    set and its held-out half). Step-down: with p_(1) <= ... <= p_(m), the i-th adjusted value is
    max over j <= i of min(1, (m - j + 1) p_(j)); reject where adjusted <= alpha.
    """
    arr = _pvalues(pvalues)
    m = arr.size
    if m == 0:
        return []
    order = np.argsort(arr, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * arr[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted.tolist()


def benjamini_hochberg(pvalues: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (q-values), in input order.

    Controls the false discovery rate over a study's many calls; reject where q <= alpha. With
    p_(1) <= ... <= p_(m), q_(i) = min over j >= i of min(1, m p_(j) / j).
    """
    arr = _pvalues(pvalues)
    m = arr.size
    if m == 0:
        return []
    order = np.argsort(arr, kind="stable")
    scaled = np.minimum(1.0, m * arr[order] / np.arange(1, m + 1))
    adjusted = np.empty(m)
    adjusted[order] = np.minimum.accumulate(scaled[::-1])[::-1]
    return adjusted.tolist()


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, tied values sharing the mean of their ranks."""
    n = x.size
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], n]  # exclusive
    mean_rank = (starts + ends + 1) / 2.0  # mean of starts+1 .. ends
    ranks = np.empty(n)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (True / 1 is positive).

    The probability that a random positive scores above a random negative, ties counting 1/2
    (the Mann-Whitney U statistic over n_pos * n_neg). NaN when a class is empty.
    """
    s = _finite_1d(scores, "scores", allow_empty=True)
    y = _binary(labels, "labels")
    if y.shape != s.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} != {y.size}")
    n_pos = int(np.count_nonzero(y))
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = float(_average_ranks(s)[y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks (ties share their mean).

    NaN when either side is constant (or has fewer than two values): no ranking to correlate.
    """
    a = _finite_1d(x, "x", allow_empty=True)
    b = _finite_1d(y, "y", allow_empty=True)
    if a.shape != b.shape:
        raise ValueError(f"x and y differ in length: {a.size} != {b.size}")
    if a.size < 2:
        return float("nan")
    ra = _average_ranks(a)
    rb = _average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = math.sqrt(float(ra @ ra) * float(rb @ rb))
    if denominator == 0.0:
        return float("nan")
    return float(np.clip(float(ra @ rb) / denominator, -1.0, 1.0))


def bootstrap_statistic(
    statistic: Callable[..., float],
    arrays: Sequence[np.ndarray],
    alpha: float,
    resamples: int,
    seed: int,
) -> tuple[float, float, float]:
    """A statistic of paired arrays with its (1 - 2 alpha) percentile interval.

    Rows are resampled together, iid (e.g. a study's runs: a metric and the recovery it should
    predict). Returns ``(statistic(*arrays), lower, upper)``. Resamples where the statistic is
    NaN (e.g. AUROC of a resample holding one class) are dropped; if none is left the bounds are
    NaN. Loops over resamples, since ``statistic`` is arbitrary Python.
    """
    alpha = _check_alpha(alpha)
    resamples = int(resamples)
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if len(arrays) == 0:
        raise ValueError("arrays is empty: no data for the statistic")
    data = [np.asarray(a) for a in arrays]
    n = data[0].shape[0] if data[0].ndim else 0
    if n == 0:
        raise ValueError("arrays have no rows")
    if any(a.ndim == 0 or a.shape[0] != n for a in data):
        raise ValueError(f"arrays must all have {n} rows: got {[a.shape for a in data]}")
    value = float(statistic(*data))
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(resamples, n))
    draws = np.array([statistic(*(a[rows] for a in data)) for rows in index], dtype=float)
    draws = draws[~np.isnan(draws)]
    if draws.size == 0:
        return value, float("nan"), float("nan")
    low, high = np.quantile(draws, [alpha, 1.0 - alpha])
    return value, float(low), float(high)


def facts_needed(
    values: np.ndarray, groups: Sequence | None, gap: float, alpha: float
) -> int | None:
    """Roughly how many facts (rows) would decide an inconclusive call, at the observed spread.

    The number n' at which a one-sided (1 - alpha) normal-approximation bound lies ``gap`` away
    from the mean: ``n' = n * (z * se / gap)^2``, with z the normal (1 - alpha) quantile and se
    the cluster-robust standard error of the mean, ``sqrt(sum_g (S_g - n_g * mean)^2) / n``
    (S_g, n_g the sum and size of group g; every row its own group when ``groups`` is None). It
    assumes more facts come in groups like the present ones. Rounded up (ignoring float noise
    of 1e-9), so it is at least n + 1 whenever the current n does not suffice.

    None when undefined: ``gap <= 0`` (the mean sits on the wrong side of the margin: more facts
    cannot decide it) or se == 0 (no spread to scale).
    """
    alpha = _check_alpha(alpha)
    arr = _finite_1d(values, "values")
    gap = float(gap)
    if math.isnan(gap):
        raise ValueError("gap is NaN")
    if gap <= 0.0:
        return None
    n = arr.size
    codes, n_groups = _group_codes(groups, n)
    mean = float(arr.mean())
    group_sums = np.bincount(codes, weights=arr, minlength=n_groups)
    group_sizes = np.bincount(codes, minlength=n_groups)
    residuals = group_sums - group_sizes * mean
    se = math.sqrt(float(residuals @ residuals)) / n
    # Identical values leave only rounding residue in se: treat it as zero.
    if se <= 1e-12 * max(1.0, float(np.max(np.abs(arr)))):
        return None
    z = NormalDist().inv_cdf(1.0 - alpha)
    needed = n * (z * se / gap) ** 2
    return max(1, math.ceil(needed * (1.0 - 1e-9)))


def wilson(successes: int, n: int, alpha: float) -> tuple[float, float, float]:
    """A share with its Wilson score interval: ``(k / n, lower, upper)``, each bound one-sided
    at ``1 - alpha`` (a ``1 - 2 alpha`` interval); NaN for ``n = 0``.

    Unlike the normal interval it stays inside [0, 1] and does not collapse at 0 or n of n,
    which a study's few runs per cell often give.
    """
    alpha = _check_alpha(alpha)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in 0..n, got {successes} of {n}")
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    z = NormalDist().inv_cdf(1.0 - alpha)
    share = successes / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return share, max(0.0, centre - half), min(1.0, centre + half)
