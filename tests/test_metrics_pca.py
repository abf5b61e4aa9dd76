"""PCA similarity, shift and distance: sign-free, planted directions and shifts recovered; the
SVD and covariance fits agree, and one fit per set gives every view the separate fits gave."""

from __future__ import annotations

import numpy as np
import pytest

from unlearning_audit.metrics import (
    linear_cka,
    mean_pca_distance,
    pca_distance,
    pca_metrics,
    pca_shift,
    pca_similarity,
    table,
)
from unlearning_audit.metrics.pca import fit_pca

STDS = np.array([5.0, 2.0, 0.5, 0.4, 0.3, 0.2])


def planted(seed: int, n: int = 2000, stds: np.ndarray = STDS) -> np.ndarray:
    """Centred-ish data whose principal axes are the coordinate axes, in order of ``stds``."""
    return np.random.default_rng(seed).normal(size=(n, len(stds))) * stds + 1.0


def rotation_within(basis: np.ndarray, degrees: float) -> np.ndarray:
    """Rotation by ``degrees`` within the plane spanned by the two orthonormal columns of
    ``basis``, identity on its orthogonal complement."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    turn = np.array([[c, -s], [s, c]]) - np.eye(2)
    return np.eye(basis.shape[0]) + basis @ turn @ basis.T


def test_orientation_is_deterministic_so_a_sign_flip_changes_nothing() -> None:
    X = planted(0)
    np.testing.assert_array_equal(fit_pca(-X, 3).components, fit_pca(X, 3).components)
    for k in (1, 2):
        assert pca_similarity(X, -X, k=k) == pytest.approx(1.0, abs=1e-12)


def test_similarity_is_one_for_scaled_and_translated_data() -> None:
    X = planted(1)
    assert pca_similarity(X, 3.0 * X + 10.0) == pytest.approx(1.0, abs=1e-12)


def test_rotation_within_the_top_plane_keeps_the_subspace_but_turns_pc1() -> None:
    X = planted(2)
    Y = X @ rotation_within(fit_pca(X, 2).components, 30.0).T
    assert pca_similarity(X, Y, k=2) == pytest.approx(1.0, abs=1e-9)
    assert pca_similarity(X, Y, k=1) == pytest.approx(np.cos(np.radians(30.0)), abs=0.02)


def test_planted_orthogonal_direction_reads_as_dissimilar() -> None:
    X = planted(3)
    Y = planted(4, stds=STDS[[1, 0, 2, 3, 4, 5]])
    assert pca_similarity(X, Y) < 0.05
    assert pca_similarity(X, Y, k=2) > 0.95


def test_shift_recovers_a_planted_mean_shift_along_pc1() -> None:
    X = planted(5)
    for shift in (2.0, -2.0):
        result = pca_shift(X, X + shift * np.eye(6)[0])
        assert result["shift_pc1"] == pytest.approx(shift, rel=1e-3)
        assert result["shift_pc1_norm"] == pytest.approx(shift / 5.0, rel=0.05)
        assert result["shift_pc2"] == pytest.approx(0.0, abs=0.01)
    assert set(pca_shift(X, X, k=3)) == {
        f"shift_pc{c}{suffix}" for c in (1, 2, 3) for suffix in ("", "_norm")
    }


def test_shift_is_normalised_by_each_components_own_std() -> None:
    X = planted(6)
    result = pca_shift(X, X + 1.0 * np.eye(6)[1])
    assert result["shift_pc2"] == pytest.approx(1.0, rel=1e-3)
    assert result["shift_pc2_norm"] == pytest.approx(1.0 / 2.0, rel=0.05)


def test_mean_pca_distance_is_zero_for_identical_inputs_and_grows_with_shift() -> None:
    Xs = [planted(7), planted(8)]
    assert mean_pca_distance(Xs, [X.copy() for X in Xs]) == 0.0
    distances = [
        mean_pca_distance(Xs, [X + shift * np.eye(6)[0] for X in Xs]) for shift in (0.5, 1.0, 2.0)
    ]
    assert distances == sorted(distances)
    assert distances[0] > 0


def test_pca_distance_is_normalised_by_the_top_k_spread() -> None:
    X = planted(9)
    fit = fit_pca(X, 2)
    Y = X + 3.0 * fit.components[:, 0]
    assert pca_distance(X, Y, k=2) == pytest.approx(3.0 / np.sqrt(fit.variances.sum()), rel=1e-9)


def wide_pair(seed: int, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Paired float32 activations with a decaying spectrum (distinct top variances), Y a noisy,
    shifted map of X, so the top components differ between the two."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * np.geomspace(4.0, 0.1, d) + rng.normal(size=d)
    Y = X @ (np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)) + 0.2
    return X.astype(np.float32), (Y + 0.1 * rng.normal(size=(n, d))).astype(np.float32)


def covariance_views(X: np.ndarray, Y: np.ndarray, k: int) -> dict[str, float]:
    """The views as the metrics table computed them before one fit served all: each metric
    from its own eigendecomposition of the d x d covariance, the formulas written out."""
    x1, y1 = fit_pca(X, 1, "covariance"), fit_pca(Y, 1, "covariance")
    xk, yk = fit_pca(X, k, "covariance"), fit_pca(Y, k, "covariance")
    offset = Y.mean(axis=0, dtype=np.float64) - X.mean(axis=0, dtype=np.float64)
    shifts = offset @ xk.components
    views = {
        "similarity": abs(float(x1.components[:, 0] @ y1.components[:, 0])),
        f"similarity_top{k}": np.linalg.svd(xk.components.T @ yk.components)[1].mean(),
        "distance": np.linalg.norm(shifts) / np.sqrt(xk.variances.sum()),
    }
    for c in range(k):
        views[f"shift_pc{c + 1}"] = shifts[c]
        views[f"shift_pc{c + 1}_norm"] = shifts[c] / np.sqrt(xk.variances[c])
    return views


@pytest.mark.parametrize(("n", "d"), [(20, 64), (64, 64), (120, 16)])
def test_svd_and_covariance_fits_give_the_same_components_and_variances(n: int, d: int) -> None:
    X = wide_pair(n + d, n, d)[0]
    k = min(4, n - 1)
    svd, covariance = fit_pca(X, k, "svd"), fit_pca(X, k, "covariance")
    assert np.abs(np.sum(svd.components * covariance.components, axis=0)) == pytest.approx(
        np.ones(k), abs=1e-9
    )
    np.testing.assert_allclose(svd.components, covariance.components, atol=1e-6)  # same signs
    np.testing.assert_allclose(svd.variances, covariance.variances, rtol=1e-9)
    np.testing.assert_array_equal(svd.mean, covariance.mean)
    auto = fit_pca(X, k)
    np.testing.assert_array_equal(auto.components, (svd if n <= d else covariance).components)


@pytest.mark.parametrize(("n", "d", "k"), [(30, 80, 2), (30, 80, 1), (200, 24, 3)])
def test_one_fit_per_set_gives_the_old_six_fit_values(n: int, d: int, k: int) -> None:
    """pca_metrics against the separate covariance fits (to 1e-6, as the metrics table must
    match), and against the public single-view functions (to rounding)."""
    X, Y = wide_pair(n * d + k, n, d)
    views = pca_metrics(X, Y, k)
    old = covariance_views(X, Y, k)
    assert list(views) == list(old)
    for name, value in old.items():
        assert views[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name
    single = {
        "similarity": pca_similarity(X, Y),
        f"similarity_top{k}": pca_similarity(X, Y, k=k),
        "distance": pca_distance(X, Y, k=k),
        **pca_shift(X, Y, k=k),
    }
    assert views == pytest.approx(single, rel=1e-12, abs=1e-12)


def test_a_layers_table_values_equal_the_old_route_in_the_old_order() -> None:
    """The metrics table's values for one layer of float32 activations (n < d: the Gram and SVD
    routes) against feature-space CKA and the separate covariance fits, to 1e-6."""
    X, Y = wide_pair(5, 40, 96)
    old = {
        "cka": linear_cka(X, Y, method="features"),
        "cka_debiased": linear_cka(X, Y, debiased=True, method="features"),
        **{f"pca_{name}": value for name, value in covariance_views(X, Y, 2).items()},
    }
    values = table.layer_values(X, Y, k=2)
    assert list(values) == list(old)
    assert values == pytest.approx(old, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: pca_similarity(np.eye(4), np.eye(5)), "X has 4, Y has 5"),
        (lambda: pca_similarity(np.eye(4), np.eye(4)[:, :3]), "same number of columns"),
        (lambda: pca_shift(np.eye(4), np.eye(4), k=4), "k must be between 1 and"),
        (lambda: pca_shift(np.eye(4), np.full((4, 4), np.nan)), "Y contains NaN"),
        (lambda: pca_metrics(np.eye(4), np.eye(4), k=4), "k must be between 1 and"),
        (lambda: pca_metrics(np.eye(4), np.eye(4)[:3]), "X has 4, Y has 3"),
        (lambda: fit_pca(np.eye(4), 1, "eigh"), "solver must be 'auto', 'svd' or 'covariance'"),
        (lambda: mean_pca_distance([np.eye(4)], []), "same, non-zero number of layers"),
        (
            lambda: mean_pca_distance([np.eye(4), np.eye(4)], [np.eye(4), np.eye(4) + np.inf]),
            "layer 1: Y contains infinity",
        ),
    ],
)
def test_bad_input_is_refused_with_the_problem_named(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
