"""PCA views of two models' activations: direction similarity, shift along X's components.

X holds the original model's activations and Y the candidate's, rows paired (n, d). Principal
directions come from the eigendecomposition of the float64 sample covariance (ddof = 1): one
O(n d^2) product and a d x d eigenproblem, the same cost and memory as the CKA state. A principal
direction has no sign, so each is oriented to make its largest-magnitude loading positive (results
are reproducible), and similarities take absolute cosines (a flip never reads as dissimilarity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from unlearning_audit.metrics.cka import check_paired


@dataclass(frozen=True)
class PCAFit:
    """Top-k principal components of one set of activations.

    ``components`` is (d, k) with orthonormal columns, ordered by decreasing ``variances``
    (sample variances, ddof = 1, of the data projected on each column).
    """

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray


def fit_pca(X: np.ndarray, k: int) -> PCAFit:
    """Fit the top-``k`` components of X (n, d); 1 <= k <= min(d, n - 1)."""
    n, d = X.shape
    if not 1 <= k <= min(d, n - 1):
        raise ValueError(
            f"k must be between 1 and min(d, n - 1) = {min(d, n - 1)} (d = {d} features, "
            f"n = {n} rows), got {k}"
        )
    mean = X.mean(axis=0, dtype=np.float64)
    centred = np.subtract(X, mean, dtype=np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / (n - 1))
    top = np.argsort(eigenvalues)[::-1][:k]
    components = eigenvectors[:, top]
    largest = np.abs(components).argmax(axis=0)
    components *= np.sign(components[largest, np.arange(k)])
    return PCAFit(mean, components, np.clip(eigenvalues[top], 0.0, None))


def pca_similarity(X: ArrayLike, Y: ArrayLike, k: int = 1) -> float:
    """Similarity of the top-``k`` principal subspaces of X and of Y, in [0, 1].

    Each is fitted on its own centred data. The cosines of the principal angles between the
    two subspaces are the singular values of Ux^T Uy (Ux, Uy: (d, k) orthonormal bases); this
    returns their mean. For k = 1 that is |cos| between the first principal directions.
    """
    X, Y = check_paired(X, Y, min_rows=2, what="PCA similarity", same_columns=True)
    ux, uy = fit_pca(X, k).components, fit_pca(Y, k).components
    cosines = np.linalg.svd(ux.T @ uy, compute_uv=False)
    return float(np.clip(cosines, 0.0, 1.0).mean())


def pca_shift(X: ArrayLike, Y: ArrayLike, k: int = 2) -> dict[str, float]:
    """How far Y's centroid lies from X's along each of X's top-``k`` principal components.

    Fits PCA(k) on X and projects both sets, centred by X's mean, on its components u_c. For
    c in 1..k: ``shift_pc{c}`` = mean projection of Y - mean projection of X
    = (mean(Y) - mean(X)) . u_c, and ``shift_pc{c}_norm`` = that divided by X's standard
    deviation along u_c (sqrt of the component's sample variance), i.e. in units of X's spread.
    """
    X, Y = check_paired(X, Y, min_rows=2, what="PCA shift", same_columns=True)
    fit = fit_pca(X, k)
    shifts = _centroid_offset(X, Y) @ fit.components
    result = {}
    for c, (shift, variance) in enumerate(zip(shifts, fit.variances, strict=True), start=1):
        result[f"shift_pc{c}"] = float(shift)
        result[f"shift_pc{c}_norm"] = float(shift / np.sqrt(variance))
    return result


def pca_distance(X: ArrayLike, Y: ArrayLike, k: int = 2) -> float:
    """Distance between the centroids of X and Y in X's top-``k`` PCA space, in X's spread.

    ||U^T (mean(Y) - mean(X))|| / sqrt(sum of X's top-k component variances), U = X's (d, k)
    components: 0 when the centroids agree there, 1 when they are one total standard deviation
    (of X's top-k subspace) apart.
    """
    X, Y = check_paired(X, Y, min_rows=2, what="PCA distance", same_columns=True)
    fit = fit_pca(X, k)
    offset = _centroid_offset(X, Y) @ fit.components
    return float(np.linalg.norm(offset) / np.sqrt(fit.variances.sum()))


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


def _centroid_offset(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """mean(Y) - mean(X) in float64."""
    return Y.mean(axis=0, dtype=np.float64) - X.mean(axis=0, dtype=np.float64)
