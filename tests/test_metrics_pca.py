"""PCA similarity, shift and distance: sign-free, planted directions and shifts recovered."""

from __future__ import annotations

import numpy as np
import pytest

from unlearning_audit.metrics import mean_pca_distance, pca_distance, pca_shift, pca_similarity
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


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: pca_similarity(np.eye(4), np.eye(5)), "X has 4, Y has 5"),
        (lambda: pca_similarity(np.eye(4), np.eye(4)[:, :3]), "same number of columns"),
        (lambda: pca_shift(np.eye(4), np.eye(4), k=4), "k must be between 1 and"),
        (lambda: pca_shift(np.eye(4), np.full((4, 4), np.nan)), "Y contains NaN"),
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
