"""PCA views of two models' activations: direction similarity, shift along X's components.

X holds the original model's activations and Y the candidate's, rows paired (n, d). Each set is
fitted once (:func:`fit_pca`), and every view is read off the fits (:func:`pca_metrics` gives
all of them, as the metrics table records them). The fit takes the cheaper exact route for the
shape: with fewer rows than features (probe sets of a few hundred rows, widths in the
thousands), a thin SVD of the centred n x d matrix, O(n^2 d); otherwise the eigendecomposition of
the d x d sample covariance, O(n d^2 + d^3). Both give the same components and variances. A
principal direction has no sign, so each is oriented to make its largest-magnitude loading
positive (results are reproducible), and similarities take absolute cosines (a flip never reads
as dissimilarity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from unlearning_audit.metrics.cka import check_paired

Solver = Literal["auto", "svd", "covariance"]


@dataclass(frozen=True)
class PCAFit:
    """Top-k principal components of one set of activations.

    ``mean`` is the (d,) float64 column mean; ``components`` is (d, k) with orthonormal columns,
    ordered by decreasing ``variances`` (sample variances, ddof = 1, of the data projected on
    each column).
    """

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray


def fit_pca(X: np.ndarray, k: int, solver: Solver = "auto") -> PCAFit:
    """Fit the top-``k`` components of X (n, d) in float64; 1 <= k <= min(d, n - 1).

    ``solver``: ``"svd"``, a thin SVD of the centred data (the cheaper when n <= d);
    ``"covariance"``, the eigendecomposition of the d x d sample covariance (the cheaper when
    n > d); ``"auto"`` picks the cheaper for the shape.
    """
    n, d = X.shape
    if not 1 <= k <= min(d, n - 1):
        raise ValueError(
            f"k must be between 1 and min(d, n - 1) = {min(d, n - 1)} (d = {d} features, "
            f"n = {n} rows), got {k}"
        )
    if solver not in ("auto", "svd", "covariance"):
        raise ValueError(f"solver must be 'auto', 'svd' or 'covariance', got {solver!r}")
    mean = X.mean(axis=0, dtype=np.float64)
    centred = np.subtract(X, mean, dtype=np.float64)
    if solver == "svd" or (solver == "auto" and n <= d):
        _, singular, rows = np.linalg.svd(centred, full_matrices=False)
        components, variances = rows[:k].T, singular[:k] ** 2 / (n - 1)
    else:
        eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / (n - 1))
        top = np.argsort(eigenvalues)[::-1][:k]
        components, variances = eigenvectors[:, top], np.clip(eigenvalues[top], 0.0, None)
    largest = np.abs(components).argmax(axis=0)
    components = components * np.sign(components[largest, np.arange(k)])
    return PCAFit(mean, components, variances)


def pca_metrics(X: ArrayLike, Y: ArrayLike, k: int = 2) -> dict[str, float]:
    """Every PCA view the metrics table records, from one fit of X and one of Y (top ``k``).

    Keys: ``similarity`` (k = 1 of :func:`pca_similarity`), ``similarity_top{k}``,
    ``distance`` (:func:`pca_distance`), then ``shift_pc{c}`` and ``shift_pc{c}_norm`` for
    c in 1..k (:func:`pca_shift`). The top-1 fit is the first column of the top-k fit, so the
    values equal those functions' own.
    """
    X, Y = check_paired(X, Y, min_rows=2, what="PCA metrics", same_columns=True)
    fit_x, fit_y = fit_pca(X, k), fit_pca(Y, k)
    offset = fit_y.mean - fit_x.mean
    return {
        "similarity": _similarity(fit_x.components[:, :1], fit_y.components[:, :1]),
        f"similarity_top{k}": _similarity(fit_x.components, fit_y.components),
        "distance": _distance(fit_x, offset),
        **_shift(fit_x, offset),
    }


def pca_similarity(X: ArrayLike, Y: ArrayLike, k: int = 1) -> float:
    """Similarity of the top-``k`` principal subspaces of X and of Y, in [0, 1].

    Each is fitted on its own centred data. The cosines of the principal angles between the
    two subspaces are the singular values of Ux^T Uy (Ux, Uy: (d, k) orthonormal bases); this
    returns their mean. For k = 1 that is |cos| between the first principal directions.
    """
    X, Y = check_paired(X, Y, min_rows=2, what="PCA similarity", same_columns=True)
    return _similarity(fit_pca(X, k).components, fit_pca(Y, k).components)


def pca_shift(X: ArrayLike, Y: ArrayLike, k: int = 2) -> dict[str, float]:
    """How far Y's centroid lies from X's along each of X's top-``k`` principal components.

    Fits PCA(k) on X and projects both sets, centred by X's mean, on its components u_c. For
    c in 1..k: ``shift_pc{c}`` = mean projection of Y - mean projection of X
    = (mean(Y) - mean(X)) . u_c, and ``shift_pc{c}_norm`` = that divided by X's standard
    deviation along u_c (sqrt of the component's sample variance), i.e. in units of X's spread.
    """
    X, Y = check_paired(X, Y, min_rows=2, what="PCA shift", same_columns=True)
    fit = fit_pca(X, k)
    return _shift(fit, Y.mean(axis=0, dtype=np.float64) - fit.mean)


def pca_distance(X: ArrayLike, Y: ArrayLike, k: int = 2) -> float:
    """Distance between the centroids of X and Y in X's top-``k`` PCA space, in X's spread.

    ||U^T (mean(Y) - mean(X))|| / sqrt(sum of X's top-k component variances), U = X's (d, k)
    components: 0 when the centroids agree there, 1 when they are one total standard deviation
    (of X's top-k subspace) apart.
    """
    X, Y = check_paired(X, Y, min_rows=2, what="PCA distance", same_columns=True)
    fit = fit_pca(X, k)
    return _distance(fit, Y.mean(axis=0, dtype=np.float64) - fit.mean)


def mean_pca_distance(Xs: Sequence[ArrayLike], Ys: Sequence[ArrayLike], k: int = 2) -> float:
    """Mean over layers of :func:`pca_distance` (X's top-k space, normalised by
    sqrt of the sum of X's top-k variances); ``Xs[i]``, ``Ys[i]`` are layer i's activations."""
    if len(Xs) != len(Ys) or not Xs:
        raise ValueError(
            f"Xs and Ys must hold the same, non-zero number of layers: got {len(Xs)} and {len(Ys)}"
        )
    distances = []
    for layer, (X, Y) in enumerate(zip(Xs, Ys, strict=True)):
        try:
            distances.append(pca_distance(X, Y, k))
        except ValueError as error:
            raise ValueError(f"layer {layer}: {error}") from error
    return float(np.mean(distances))


def _similarity(ux: np.ndarray, uy: np.ndarray) -> float:
    """Mean cosine of the principal angles between the spans of two orthonormal bases."""
    cosines = np.linalg.svd(ux.T @ uy, compute_uv=False)
    return float(np.clip(cosines, 0.0, 1.0).mean())


def _shift(fit: PCAFit, offset: np.ndarray) -> dict[str, float]:
    """The centroid offset mean(Y) - mean(X) along each fitted component, raw and in units of
    that component's standard deviation (:func:`pca_shift`)."""
    result = {}
    shifts = offset @ fit.components
    for c, (shift, variance) in enumerate(zip(shifts, fit.variances, strict=True), start=1):
        result[f"shift_pc{c}"] = float(shift)
        result[f"shift_pc{c}_norm"] = float(shift / np.sqrt(variance))
    return result


def _distance(fit: PCAFit, offset: np.ndarray) -> float:
    """Length of the centroid offset in the fitted subspace over its total standard deviation
    (:func:`pca_distance`)."""
    return float(np.linalg.norm(offset @ fit.components) / np.sqrt(fit.variances.sum()))
