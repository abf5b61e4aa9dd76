"""Representation metrics: how far a candidate model's internals moved from the original's.

All take the original model's side first. Activations are numpy arrays of paired rows (one per
probe sample) with features in columns, X for the original and Y for the candidate; models are
``torch.nn.Module`` causal LMs whose parameters are grouped into layers as in
:mod:`unlearning_audit.layers` (0 = embeddings, i = decoder block i - 1, L + 1 = final norm and
head).

* :func:`linear_cka`, :func:`cka_moments`, :class:`CKAAccumulator`: linear CKA, biased or
  debiased, in memory by the cheaper route for the shape (n x n kernels when n < d), or streamed
  over batches with O(d^2) float64 state (never n x n).
* :func:`pca_similarity`, :func:`pca_shift`, :func:`pca_distance`, :func:`mean_pca_distance`,
  :func:`pca_metrics` (all of them from one fit per set): principal directions compared
  sign-free, and the candidate's centroid in the original's principal axes.
* :func:`fisher_diagonal`, :func:`fisher_summary`, :func:`fisher_weighted_distance`: diagonal
  Fisher per layer from per-sample gradients over answer tokens, empirical (the data's labels)
  or the model's (labels drawn from the model).
* :func:`weight_change`: relative Frobenius change of each layer's weights.
* :mod:`~unlearning_audit.metrics.depth`: the share of the squared weight change and of the
  Fisher-weighted distance in the last k blocks plus the head (a tied head/embedding matrix
  counted apart).
"""

from unlearning_audit.metrics.cka import CKAAccumulator, cka_moments, linear_cka
from unlearning_audit.metrics.fisher import (
    FISHER_LOG10_EDGES,
    FISHER_QUANTILES,
    fisher_diagonal,
    fisher_summary,
    fisher_weighted_distance,
)
from unlearning_audit.metrics.pca import (
    mean_pca_distance,
    pca_distance,
    pca_metrics,
    pca_shift,
    pca_similarity,
)
from unlearning_audit.metrics.weights import layer_parameters, weight_change

__all__ = [
    "FISHER_LOG10_EDGES",
    "FISHER_QUANTILES",
    "CKAAccumulator",
    "cka_moments",
    "fisher_diagonal",
    "fisher_summary",
    "fisher_weighted_distance",
    "layer_parameters",
    "linear_cka",
    "mean_pca_distance",
    "pca_distance",
    "pca_metrics",
    "pca_shift",
    "pca_similarity",
    "weight_change",
]
