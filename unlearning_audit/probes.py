"""Linear probes as a recovery attack: is the forgotten answer still linearly decodable?

A regularised logistic-regression probe per layer reads the answer (the attribute value, e.g. a
birthplace, out of its vocabulary; or the first answer token for external data) from the pooled
activations of a question. It is trained on retain questions, whose answers the model still
gives, and tested on the forget questions. Chance is measured, not assumed: the same probe
trained on shuffled labels gives the permutation baseline. Knowledge the unlearned model cannot
say but a probe still decodes above that baseline is hidden, not deleted.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def _probe(C: float, seed: int):
    return make_pipeline(
        StandardScaler(), LogisticRegression(C=C, tol=1e-3, max_iter=500, random_state=seed)
    )


def _quietly(fn):
    """Run ``fn`` without scikit-learn's small-sample warnings (many classes, few rows): the
    permutation baseline, not a warning, tells whether a probe means anything."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", ConvergenceWarning)
            return fn(*args, **kwargs)

    return wrapper


def _check(X: np.ndarray, y: Sequence, name: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(
            f"{name}: need a 2-D array with one row per label, got {X.shape} for {len(y)} labels"
        )
    if not np.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or inf")
    return X


def transfer_accuracy(
    X_train: np.ndarray,
    y_train: Sequence,
    X_test: np.ndarray,
    y_test: Sequence,
    C: float = 0.1,
    seed: int = 0,
) -> float:
    """Accuracy on (X_test, y_test) of a probe fitted on (X_train, y_train)."""
    X_train, X_test = _check(X_train, y_train, "X_train"), _check(X_test, y_test, "X_test")
    if len(set(y_train)) < 2:
        return float("nan")
    probe = _probe(C, seed).fit(X_train, list(y_train))
    return float(np.mean(probe.predict(X_test) == np.asarray(list(y_test))))


def permutation_baseline(
    X_train: np.ndarray,
    y_train: Sequence,
    X_test: np.ndarray,
    y_test: Sequence,
    C: float = 0.1,
    n_permutations: int = 3,
    seed: int = 0,
    strata: Sequence | None = None,
) -> float:
    """Mean transfer accuracy of probes fitted on shuffled training labels: measured chance.

    With ``strata`` (e.g. each row's attribute), labels are shuffled only within a stratum, so
    chance keeps what the question itself gives away (which vocabulary the answer is from).
    """
    rng = np.random.default_rng(seed)
    y = np.asarray(list(y_train))
    groups = np.zeros(len(y)) if strata is None else np.asarray(list(strata))

    def shuffled() -> np.ndarray:
        out = y.copy()
        for g in np.unique(groups):
            idx = np.flatnonzero(groups == g)
            out[idx] = y[rng.permutation(idx)]
        return out

    return float(
        np.mean(
            [
                transfer_accuracy(X_train, shuffled(), X_test, y_test, C, seed)
                for _ in range(n_permutations)
            ]
        )
    )


def cv_accuracy(X: np.ndarray, y: Sequence, folds: int = 3, C: float = 0.1, seed: int = 0) -> float:
    """Cross-validated probe accuracy (stratified where every class has enough rows)."""
    X, y = _check(X, y, "X"), np.asarray(list(y))
    counts = np.unique(y, return_counts=True)[1]
    if len(counts) < 2 or len(y) < folds:
        return float("nan")
    splitter = (
        StratifiedKFold(folds, shuffle=True, random_state=seed)
        if counts.min() >= folds
        else KFold(folds, shuffle=True, random_state=seed)
    )
    return float(cross_val_score(_probe(C, seed), X, y, cv=splitter).mean())


def probe_labels(rows: Sequence[dict], label: str = "answer") -> list[str]:
    """One class per (attribute, value): a single probe decodes every attribute's vocabulary
    (the attribute itself is plain in the question, so it adds no difficulty)."""
    return [f"{r.get('attribute', '')}={r[label]}" for r in rows]


@_quietly
def probe_layer(
    X_retain: np.ndarray,
    retain_rows: Sequence[dict],
    X_forget: np.ndarray,
    forget_rows: Sequence[dict],
    label: str = "answer",
    C: float = 0.1,
    seed: int = 0,
) -> dict[str, float]:
    """Probe accuracies of one layer.

    ``probe_forget``: a probe trained on the retain questions, tested on the forget questions;
    ``probe_chance``: the same with shuffled training labels (measured chance);
    ``probe_retain_cv``: cross-validated accuracy on the retain questions (probe capacity);
    ``probe_coverage``: the share of forget answers that occur among the retain answers (a probe
    can only name a class it was trained on; with none, every value is NaN).
    """
    y_retain, y_forget = probe_labels(retain_rows, label), probe_labels(forget_rows, label)
    coverage = float(np.mean([y in set(y_retain) for y in y_forget])) if y_forget else 0.0
    if coverage == 0.0:  # no forget answer occurs in training (e.g. unique sums): undecidable
        nan = float("nan")
        return {
            "probe_forget": nan,
            "probe_chance": nan,
            "probe_retain_cv": nan,
            "probe_coverage": coverage,
        }
    strata = [r.get("attribute", "") for r in retain_rows]
    return {
        "probe_forget": transfer_accuracy(X_retain, y_retain, X_forget, y_forget, C, seed),
        "probe_chance": permutation_baseline(
            X_retain, y_retain, X_forget, y_forget, C, 3, seed, strata
        ),
        "probe_retain_cv": cv_accuracy(X_retain, y_retain, folds=3, C=C, seed=seed),
        "probe_coverage": coverage,
    }
