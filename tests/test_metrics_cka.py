"""Linear CKA: streaming against in-memory, the feature and Gram routes against each other and
against the Gram-matrix definitions, invariances."""

from __future__ import annotations

import numpy as np
import pytest

from unlearning_audit.metrics import CKAAccumulator, cka, cka_moments, linear_cka

METHODS = ("features", "gram")


def related_pair(
    seed: int, n: int = 60, dims: tuple[int, int] = (9, 7)
) -> tuple[np.ndarray, np.ndarray]:
    """Paired activations with shared structure, non-zero means and different widths."""
    rng = np.random.default_rng(seed)
    dx, dy = dims
    X = rng.normal(size=(n, dx)) * rng.uniform(0.5, 3.0, size=dx) + 4.0
    shared = min(6, dx)
    Y = X[:, :shared] @ rng.normal(size=(shared, dy)) + rng.normal(size=(n, dy)) - 2.0
    return X, Y


def gram_hsic_biased(K: np.ndarray, L: np.ndarray) -> float:
    """tr(K H L H) / (n - 1)^2 with the centring matrix H = I - 11^T / n."""
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(K @ H @ L @ H)) / (n - 1) ** 2


def gram_hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. (2007), eq. (5), with the Gram matrices' diagonals set to zero."""
    n = K.shape[0]
    K, L = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(n)
    return (
        np.trace(K @ L)
        + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ K @ L @ one)
    ) / (n * (n - 3))


def gram_cka(X: np.ndarray, Y: np.ndarray, debiased: bool) -> float:
    hsic = gram_hsic_unbiased if debiased else gram_hsic_biased
    K, L = X @ X.T, Y @ Y.T
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


@pytest.mark.parametrize("debiased", [False, True])
def test_streaming_equals_in_memory_with_uneven_batches(debiased: bool) -> None:
    X, Y = related_pair(0, n=101)
    accumulator = CKAAccumulator(X.shape[1], Y.shape[1], debiased=debiased)
    for start, stop in [(0, 5), (5, 6), (6, 40), (40, 40), (40, 101)]:
        accumulator.update(X[start:stop], Y[start:stop])
    assert accumulator.n == 101
    assert accumulator.result() == pytest.approx(linear_cka(X, Y, debiased=debiased), rel=1e-9)


@pytest.mark.parametrize("debiased", [False, True])
def test_large_offsets_cost_no_precision_in_streaming(debiased: bool) -> None:
    """Raw moments at offset 1e6 would cancel ~12 digits; the first-batch shift avoids it."""
    X, Y = related_pair(7, n=101)
    accumulator = CKAAccumulator(X.shape[1], Y.shape[1], debiased=debiased)
    for start in range(0, 101, 25):
        accumulator.update(X[start : start + 25] + 1e6, Y[start : start + 25] - 1e6)
    expected = linear_cka(X - X.mean(0), Y - Y.mean(0), debiased=debiased)
    assert accumulator.result() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize(("seed", "n", "dims"), [(1, 60, (9, 7)), (2, 12, (40, 30))])
def test_equals_gram_matrix_definition(
    method: str, debiased: bool, seed: int, n: int, dims: tuple[int, int]
) -> None:
    X, Y = related_pair(seed, n, dims)
    assert linear_cka(X, Y, debiased, method) == pytest.approx(gram_cka(X, Y, debiased), rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_the_feature_and_gram_routes_agree_at_any_shape(seed: int) -> None:
    """Random shapes on both sides of n = d, in float64 and in float32 (the feature route's
    float32 products against the Gram route's float64)."""
    rng = np.random.default_rng(200 + seed)
    n, dx, dy = rng.integers(5, 80, size=3)
    X, Y = related_pair(seed, n, (dx, dy))
    for dtype, rel in ((np.float64, 1e-9), (np.float32, 1e-6)):
        features = cka_moments(X.astype(dtype), Y.astype(dtype), "features")
        gram = cka_moments(X.astype(dtype), Y.astype(dtype), "gram")
        for debiased in (False, True):
            assert gram.cka(debiased) == pytest.approx(features.cka(debiased), rel=rel)


@pytest.mark.parametrize(("n", "route"), [(30, "gram"), (40, "features"), (60, "features")])
def test_auto_takes_the_gram_route_below_both_widths(n: int, route: str) -> None:
    X, Y = related_pair(13, n, (50, 40))
    assert cka_moments(X, Y) == cka_moments(X, Y, route)


def test_debiased_differs_from_biased() -> None:
    X, Y = related_pair(3, n=20)
    assert abs(linear_cka(X, Y, debiased=True) - linear_cka(X, Y)) > 1e-3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize(("n", "dims"), [(60, (9, 7)), (12, (40, 30))])
def test_self_similarity_and_invariances(
    method: str, debiased: bool, n: int, dims: tuple[int, int]
) -> None:
    X, Y = related_pair(4, n, dims)
    rng = np.random.default_rng(4)
    rotation, _ = np.linalg.qr(rng.normal(size=(dims[0], dims[0])))
    assert linear_cka(X, X, debiased, method) == pytest.approx(1.0, rel=1e-12)
    assert linear_cka(X, X @ rotation, debiased, method) == pytest.approx(1.0, rel=1e-10)
    assert linear_cka(X, 7.5 * X + 3.0, debiased, method) == pytest.approx(1.0, rel=1e-10)
    assert linear_cka(X, 0.01 * Y[:, ::-1], debiased, method) == pytest.approx(
        linear_cka(X, Y, debiased, method), rel=1e-10
    )


def test_not_invariant_to_anisotropic_linear_map() -> None:
    X = np.random.default_rng(5).normal(size=(200, 8))
    stretch = np.diag(np.logspace(0, 1.5, 8))
    assert linear_cka(X, X @ stretch) < 0.8


def test_debiased_is_near_zero_for_independent_data_where_biased_is_not() -> None:
    biased, debiased = [], []
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        X, Y = rng.normal(size=(32, 64)), rng.normal(size=(32, 64))
        biased.append(linear_cka(X, Y))
        debiased.append(linear_cka(X, Y, debiased=True))
    assert abs(np.mean(debiased)) < 0.05
    assert np.mean(biased) > 0.15


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_low_precision_input_stays_within_1e7_of_float64(debiased: bool, dtype: type) -> None:
    """float32 blocks summed in float64: the same value as float64 arithmetic on the same
    numbers, to 1e-7 relative, also with offsets far larger than the spread."""
    rng = np.random.default_rng(11)
    X = rng.normal(size=(3000, 48)) * rng.uniform(0.1, 3.0, size=48) + rng.uniform(-50, 50, 48)
    Y = X @ rng.normal(size=(48, 40)) / 7 + rng.normal(size=(3000, 40))
    X, Y = X.astype(dtype), Y.astype(dtype)
    exact = linear_cka(X.astype(np.float64), Y.astype(np.float64), debiased=debiased)
    assert linear_cka(X, Y, debiased=debiased) == pytest.approx(exact, rel=1e-7)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("offset", [10.0, 100.0])
def test_a_first_batch_unlike_the_rest_costs_no_precision(debiased: bool, offset: float) -> None:
    """The shift comes from the first batch; when it lies far from the rest, float32 products
    would cancel digits in centring, so those blocks are formed in float64."""
    rng = np.random.default_rng(12)
    X = rng.normal(size=(6000, 32))
    Y = X @ rng.normal(size=(32, 24)) / 5 + rng.normal(size=(6000, 24))
    X[:8] += offset
    X, Y = X.astype(np.float32), Y.astype(np.float32)
    accumulator = CKAAccumulator(32, 24, debiased=debiased)
    accumulator.update(X[:8], Y[:8])
    accumulator.update(X[8:], Y[8:])
    exact = linear_cka(X.astype(np.float64), Y.astype(np.float64), debiased=debiased)
    assert accumulator.result() == pytest.approx(exact, rel=1e-7)


@pytest.mark.parametrize("debiased", [False, True])
def test_batches_larger_than_a_block_are_split_exactly(
    debiased: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    X, Y = related_pair(8, n=101)
    monkeypatch.setattr(cka, "BLOCK_ROWS", 16)
    assert linear_cka(X, Y, debiased=debiased) == pytest.approx(gram_cka(X, Y, debiased), rel=1e-9)


def test_one_debiased_pass_gives_both_values() -> None:
    X, Y = related_pair(9, n=50)
    accumulator = CKAAccumulator(X.shape[1], Y.shape[1], debiased=True)
    accumulator.update(X, Y)
    assert accumulator.result(debiased=False) == pytest.approx(linear_cka(X, Y), rel=1e-12)
    assert accumulator.result() == pytest.approx(linear_cka(X, Y, debiased=True), rel=1e-12)
    biased = CKAAccumulator(X.shape[1], Y.shape[1])
    biased.update(X, Y)
    with pytest.raises(ValueError, match="built with debiased=False"):
        biased.result(debiased=True)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("X", "Y", "debiased", "message"),
    [
        (np.ones((10, 3)), np.ones((12, 3)), False, "X has 10, Y has 12"),
        (np.ones((1, 3)), np.ones((1, 3)), False, "at least 2 rows"),
        (np.eye(3), np.eye(3), True, "debiased CKA needs at least 4 rows"),
        (np.ones(5), np.ones((5, 2)), False, "X must be a 2-D array"),
        (np.eye(5), np.full((5, 2), np.nan), False, "Y contains NaN"),
        (np.full((5, 2), np.inf), np.eye(5), False, "X contains infinity"),
        (np.ones((6, 3)), np.eye(6), False, "X has no variance"),
    ],
)
def test_bad_input_is_refused_with_the_problem_named(
    method: str, X: np.ndarray, Y: np.ndarray, debiased: bool, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        linear_cka(X, Y, debiased, method)


def test_an_unknown_method_is_named() -> None:
    with pytest.raises(ValueError, match="method must be 'auto', 'features' or 'gram', got 'svd'"):
        linear_cka(np.eye(5), np.eye(5), method="svd")


def test_accumulator_refuses_batches_of_the_wrong_width() -> None:
    accumulator = CKAAccumulator(3, 4)
    with pytest.raises(ValueError, match="expected 3 and 4"):
        accumulator.update(np.ones((5, 3)), np.ones((5, 5)))
