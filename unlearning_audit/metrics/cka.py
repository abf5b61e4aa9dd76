"""Linear CKA between two models' activations: streamed with O(d^2) memory, or through the
n x n kernels when there are fewer rows than features.

X holds the original model's activations and Y the candidate's, one row per probe sample, rows
paired. Linear CKA in feature space (Kornblith et al. 2019) is

    CKA(X, Y) = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F),    Xc = X - mean(X),

which equals HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) for the linear Gram matrices K = X X^T and
L = Y Y^T. The feature route (:class:`CKAAccumulator`) forms the d x d products, O(n d^2), and
streams; the Gram route forms the centred n x n kernels, O(n^2 d), and needs the whole arrays:
the cheaper when n < d (a probe set of 200 rows at width 4096 is about 20x less work). Both reduce
to the same statistics (:class:`CKAMoments`), from which one code computes the value.

Biased CKA is inflated at small n (independent Gaussians read about 0.2 at n = 32), so the
debiased variant replaces each HSIC by the unbiased estimator of Song et al. (2007):

    HSIC_1(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1]
                   / (n(n-3)),

where K~ and L~ are K and L with their diagonals set to zero. This estimator is invariant to
shifting X or Y by a constant row, so it may be evaluated on centred data, where the column sums
vanish and K~ 1 = -a, with a_i = ||x_i - mean(X)||^2 the diagonal of the centred Gram matrix.
Then tr(K~ L~) = ||Xc^T Yc||_F^2 - a.b, 1^T K~ 1 = -sum(a), 1^T K~ L~ 1 = a.b, and

    n(n-3) HSIC_1 = ||Xc^T Yc||_F^2 + sum(a) sum(b) / ((n-1)(n-2)) - n/(n-2) a.b,

which needs, besides the cross-products, only the row squared norms of the centred data.

Precision: the Gram route centres by the exact column means and computes in float64. The feature
route forms its products block by block (at most ``BLOCK_ROWS`` rows) and summed into
float64 state. When X and Y are both float32 or float16 (stored activations are float32), a block
is formed in float32, which takes half the time of float64; anything else is formed in float64.
Rounding errors of float32 blocks are random in sign and the rows are near-centred by the shift,
so CKA agrees with float64 arithmetic to 1e-7 relative or better (tests/test_metrics_cka.py;
bench/bench_metrics.py prints the difference at n = 50,000). A block whose mean lies farther from
the shift than its spread (a first batch unlike the rest) would lose digits when the moments are
centred, so such a block is formed in float64 instead. The two routes agree to 1e-7 or better on
float32 activations (bench/bench_metrics.py, ``--only width``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

BLOCK_ROWS = 4096
"""Rows per product block: bounds float32 rounding (errors grow with the summed length) and the
temporary memory of one update, whatever the batch size."""

Method = Literal["auto", "features", "gram"]


def as_matrix(array: ArrayLike, name: str) -> np.ndarray:
    """``array`` as a 2-D real ndarray (samples x features), or a clear error naming it."""
    matrix = np.asarray(array)
    if matrix.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array (samples x features), got shape {matrix.shape}"
        )
    if not (np.issubdtype(matrix.dtype, np.floating) or np.issubdtype(matrix.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {matrix.dtype}")
    return matrix


def check_rows(n_rows: int, min_rows: int, what: str) -> None:
    """Refuse fewer than ``min_rows`` samples for the statistic ``what``."""
    if n_rows < min_rows:
        raise ValueError(f"{what} needs at least {min_rows} rows (samples), got {n_rows}")


def check_paired(
    X: ArrayLike,
    Y: ArrayLike,
    *,
    min_rows: int,
    what: str,
    same_columns: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate paired activations, scikit-learn style, and return them as 2-D arrays.

    Checks: both 2-D and real; the same number of rows (row i of X and of Y are the same probe
    sample); at least ``min_rows`` rows; no NaN or infinity; with ``same_columns``, the same
    number of columns (statistics that compare directions in one feature space).
    """
    X, Y = as_matrix(X, "X"), as_matrix(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            "X and Y must have the same number of rows (paired samples): "
            f"X has {X.shape[0]}, Y has {Y.shape[0]}"
        )
    check_rows(X.shape[0], min_rows, what)
    if same_columns and X.shape[1] != Y.shape[1]:
        raise ValueError(
            f"{what} compares directions in one feature space, so X and Y need the same number "
            f"of columns: X has {X.shape[1]}, Y has {Y.shape[1]}"
        )
    for matrix, name in ((X, "X"), (Y, "Y")):
        if not np.isfinite(matrix).all():
            kind = "NaN" if np.isnan(matrix).any() else "infinity"
            raise ValueError(f"{name} contains {kind}")
    return X, Y


@dataclass(frozen=True)
class CKAMoments:
    """What linear CKA reads from paired data centred by its column means, Xc and Yc (n rows),
    whichever route formed it (module doc).

    ``cross`` = ||Xc^T Yc||_F^2 = tr(K L), ``self_x`` = ||Xc^T Xc||_F^2 = tr(K K), ``self_y``
    = ||Yc^T Yc||_F^2 = tr(L L), with the centred linear kernels K = Xc Xc^T and L = Yc Yc^T;
    ``norms`` = (sum a, sum b, a.a, b.b, a.b) of the centred rows' squared norms
    a_i = ||Xc_i||^2 and b_i = ||Yc_i||^2, which only the debiased value needs (None when they
    were not gathered).
    """

    n: int
    cross: float
    self_x: float
    self_y: float
    norms: tuple[float, float, float, float, float] | None = None

    def cka(self, debiased: bool = False) -> float:
        """Linear CKA, biased or (from 4 rows, with ``norms``) debiased."""
        if debiased and self.norms is None:
            raise ValueError(
                "these moments hold no row norms (an accumulator built with debiased=False): "
                "build it with debiased=True to read both values"
            )
        # 2 rows to centre; 4 for the unbiased estimator, which divides by n - 3
        check_rows(self.n, 4 if debiased else 2, "debiased CKA" if debiased else "CKA")
        hxy, hxx, hyy = self.cross, self.self_x, self.self_y
        if debiased:
            sum_a, sum_b, aa, bb, ab = self.norms
            hxy = _unbiased_hsic(hxy, sum_a, sum_b, ab, self.n)
            hxx = _unbiased_hsic(hxx, sum_a, sum_a, aa, self.n)
            hyy = _unbiased_hsic(hyy, sum_b, sum_b, bb, self.n)
        for value, name in ((hxx, "X"), (hyy, "Y")):
            if value <= 0:
                raise ValueError(
                    f"debiased CKA is undefined: the unbiased HSIC of {name} with itself is not "
                    "positive (too few rows, or nearly constant rows)"
                    if debiased
                    else f"CKA is undefined: {name} has no variance (all rows are equal)"
                )
        return float(hxy / np.sqrt(hxx * hyy))


class CKAAccumulator:
    """Streaming linear CKA: feed paired batches with :meth:`update`, read :meth:`result`.

    State is float64 and O(d^2): X^T Y, X^T X, Y^T Y and the column sums, plus, for the debiased
    variant, the moments of the row squared norms a_i = ||x_i||^2 and b_i = ||y_i||^2 (sum a,
    sum b, a.a, b.b, a.b, X^T a, X^T b, Y^T a, Y^T b). Rows are shifted by the first batch's
    mean before accumulating, so the raw moments stay small and centring them at the end
    cancels little (CKA is invariant to that shift). A debiased accumulator holds everything the
    biased value needs too: ``result(debiased=False)`` reads it from the same pass.
    """

    def __init__(self, dim_x: int, dim_y: int, debiased: bool = False) -> None:
        self.dim_x, self.dim_y, self.debiased = dim_x, dim_y, debiased
        self.n = 0
        self._shift_x = np.zeros(dim_x)
        self._shift_y = np.zeros(dim_y)
        self._xty = np.zeros((dim_x, dim_y))
        self._xtx = np.zeros((dim_x, dim_x))
        self._yty = np.zeros((dim_y, dim_y))
        self._sum_x = np.zeros(dim_x)
        self._sum_y = np.zeros(dim_y)
        self._norm_sums = np.zeros(5)  # sum a, sum b, a.a, b.b, a.b
        self._xt_ab = np.zeros((dim_x, 2))  # X^T a, X^T b
        self._yt_ab = np.zeros((dim_y, 2))  # Y^T a, Y^T b

    def update(self, x_batch: ArrayLike, y_batch: ArrayLike) -> None:
        """Add a batch of paired rows: ``x_batch`` (b, dim_x) and ``y_batch`` (b, dim_y)."""
        x, y = check_paired(x_batch, y_batch, min_rows=0, what="a CKA batch")
        if (x.shape[1], y.shape[1]) != (self.dim_x, self.dim_y):
            raise ValueError(
                f"batch has {x.shape[1]} columns in X and {y.shape[1]} in Y, "
                f"expected {self.dim_x} and {self.dim_y}"
            )
        if x.shape[0] == 0:
            return
        if self.n == 0:
            self._shift_x = x[:BLOCK_ROWS].mean(axis=0, dtype=np.float64)
            self._shift_y = y[:BLOCK_ROWS].mean(axis=0, dtype=np.float64)
        low = {np.dtype(np.float16), np.dtype(np.float32)}
        dtype = np.float32 if {x.dtype, y.dtype} <= low else np.float64
        for start in range(0, x.shape[0], BLOCK_ROWS):
            rows = slice(start, start + BLOCK_ROWS)
            xb, yb = self._shifted(x[rows], y[rows], dtype)
            if dtype != np.float64 and (_off_centre(xb) or _off_centre(yb)):
                xb, yb = self._shifted(x[rows], y[rows], np.float64)
            self._add_block(xb, yb)

    def _shifted(self, x: np.ndarray, y: np.ndarray, dtype: type) -> tuple[np.ndarray, np.ndarray]:
        """The rows minus the shift, in ``dtype``."""
        return (
            np.subtract(x, self._shift_x.astype(dtype), dtype=dtype),
            np.subtract(y, self._shift_y.astype(dtype), dtype=dtype),
        )

    def _add_block(self, x: np.ndarray, y: np.ndarray) -> None:
        """Accumulate one block of shifted rows, products in the block's dtype, sums in float64."""
        self._xty += x.T @ y
        self._xtx += x.T @ x
        self._yty += y.T @ y
        self._sum_x += x.sum(axis=0, dtype=np.float64)
        self._sum_y += y.sum(axis=0, dtype=np.float64)
        if self.debiased:
            ab = np.stack([np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)], axis=1)
            a, b = ab[:, 0].astype(np.float64), ab[:, 1].astype(np.float64)
            self._norm_sums += [a.sum(), b.sum(), a @ a, b @ b, a @ b]
            self._xt_ab += x.T @ ab
            self._yt_ab += y.T @ ab
        self.n += x.shape[0]

    def result(self, debiased: bool | None = None) -> float:
        """Linear CKA of all rows seen so far: debiased if so constructed, unless ``debiased``
        says otherwise (debiased=True needs an accumulator constructed with debiased=True)."""
        return self.moments().cka(self.debiased if debiased is None else debiased)

    def moments(self) -> CKAMoments:
        """The centred statistics of all rows seen so far, from the raw moments (the row norms'
        only when constructed with debiased=True)."""
        check_rows(self.n, 2, "CKA")  # the means divide by n
        n = self.n
        mx, my = self._sum_x / n, self._sum_y / n
        cxy = self._xty - n * np.outer(mx, my)
        cxx = self._xtx - n * np.outer(mx, mx)
        cyy = self._yty - n * np.outer(my, my)
        hxy, hxx, hyy = (float(np.vdot(c, c)) for c in (cxy, cxx, cyy))
        if not self.debiased:
            return CKAMoments(n, hxy, hxx, hyy)
        sum_a, sum_b, aa, bb, ab = self._norm_sums
        (xt_a, xt_b), (yt_a, yt_b) = self._xt_ab.T, self._yt_ab.T
        norms = (
            float(np.trace(cxx)),
            float(np.trace(cyy)),
            _centred_norm_product(aa, xt_a, xt_a, sum_a, sum_a, self._xtx, mx, mx, n),
            _centred_norm_product(bb, yt_b, yt_b, sum_b, sum_b, self._yty, my, my, n),
            _centred_norm_product(ab, yt_a, xt_b, sum_a, sum_b, self._xty, mx, my, n),
        )
        return CKAMoments(n, hxy, hxx, hyy, norms)


def _off_centre(block: np.ndarray) -> bool:
    """Whether the block's mean row is longer than its spread (|mean|^2 > mean |x - mean|^2):
    centring its float32 products would then cancel more digits than float32 carries to spare."""
    mean = block.sum(axis=0) / block.shape[0]  # the block's own precision: a threshold test
    return 2 * float(mean @ mean) > float(np.vdot(block, block)) / block.shape[0]


def _centred_norm_product(
    sum_ab: float,
    yt_a: np.ndarray,
    xt_b: np.ndarray,
    sum_a: float,
    sum_b: float,
    xty: np.ndarray,
    mx: np.ndarray,
    my: np.ndarray,
    n: int,
) -> float:
    """sum_i a'_i b'_i for the row squared norms a', b' of the centred data, from raw moments.

    With a'_i = a_i - 2 x_i.mx + |mx|^2 and b'_i = b_i - 2 y_i.my + |my|^2, expanding and using
    sum_i x_i = n mx, sum_i y_i = n my gives
    a.b - 2 (Y^T a).my - 2 (X^T b).mx + |my|^2 sum a + |mx|^2 sum b + 4 mx^T X^T Y my
    - 3 n |mx|^2 |my|^2.
    """
    mx2, my2 = mx @ mx, my @ my
    return float(
        sum_ab
        - 2 * (yt_a @ my)
        - 2 * (xt_b @ mx)
        + my2 * sum_a
        + mx2 * sum_b
        + 4 * (mx @ xty @ my)
        - 3 * n * mx2 * my2
    )


def _unbiased_hsic(cross: float, sum_a: float, sum_b: float, ab: float, n: int) -> float:
    """n(n-3) HSIC_1 from ||Xc^T Yc||_F^2, sum a, sum b and a.b of centred data (module doc)."""
    return cross + sum_a * sum_b / ((n - 1) * (n - 2)) - n / (n - 2) * ab


def cka_moments(X: ArrayLike, Y: ArrayLike, method: Method = "auto") -> CKAMoments:
    """The CKA statistics of paired activations X (n, d_x) and Y (n, d_y), in one pass that
    gives both the biased and the debiased value (``.cka(debiased)``).

    ``method``: ``"features"``, one :class:`CKAAccumulator` pass over the whole arrays (the
    d x d products, O(n d^2), in the inputs' precision as streamed); ``"gram"``, the centred
    n x n kernels in float64 (O(n^2 d)); ``"auto"``, the Gram route when n is below both widths
    (then each n x n product costs less than any d x d one), else the feature route.
    """
    X, Y = check_paired(X, Y, min_rows=2, what="CKA")
    if method not in ("auto", "features", "gram"):
        raise ValueError(f"method must be 'auto', 'features' or 'gram', got {method!r}")
    if method == "gram" or (method == "auto" and X.shape[0] < min(X.shape[1], Y.shape[1])):
        return _gram_moments(X, Y)
    accumulator = CKAAccumulator(X.shape[1], Y.shape[1], debiased=True)
    accumulator.update(X, Y)
    return accumulator.moments()


def linear_cka(
    X: ArrayLike, Y: ArrayLike, debiased: bool = False, method: Method = "auto"
) -> float:
    """Linear CKA of paired activations X (n, d_x) and Y (n, d_y), in float64 state.

    ``debiased`` uses the unbiased HSIC estimator (needs n >= 4); ``method`` picks the route
    (:func:`cka_moments`); every route gives the same value.
    """
    return cka_moments(X, Y, method).cka(debiased)


def _gram_moments(X: np.ndarray, Y: np.ndarray) -> CKAMoments:
    """CKA statistics from the centred linear kernels K = Xc Xc^T and L = Yc Yc^T, float64:
    tr(K L) = ||Xc^T Yc||_F^2, and the row squared norms are the kernels' diagonals."""
    K, L = _centred_gram(X), _centred_gram(Y)
    a, b = np.diag(K), np.diag(L)
    return CKAMoments(
        n=X.shape[0],
        cross=float(np.vdot(K, L)),
        self_x=float(np.vdot(K, K)),
        self_y=float(np.vdot(L, L)),
        norms=(float(a.sum()), float(b.sum()), float(a @ a), float(b @ b), float(a @ b)),
    )


def _centred_gram(A: np.ndarray) -> np.ndarray:
    """Xc Xc^T for the column-centred rows of A, in float64."""
    centred = np.subtract(A, A.mean(axis=0, dtype=np.float64), dtype=np.float64)
    return centred @ centred.T
