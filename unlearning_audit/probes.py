"""Linear probes as a recovery attack: is the forgotten answer still linearly decodable?

A regularised logistic-regression probe per layer reads the answer's content from the pooled
activations of a question: the attribute value (e.g. a birthplace, out of its vocabulary) where
rows name their attribute, else the answer's first content word (the first word that is neither
in the question nor a stopword: "Paris" of "The capital is Paris", never the "The" that any
model, or the question itself, gives away). It is trained on retain questions, whose answers
the model still gives, and tested on the forget questions. Chance is measured, not assumed: the
same probe trained on shuffled labels gives the permutation baseline. Knowledge the unlearned
model cannot say but a probe still decodes above that baseline is hidden, not deleted. Labels
that cannot show any (:func:`label_problem`) are refused, not probed.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

_FUNCTION_WORDS = """a an the and or but nor of in on at to for from by with as into onto than
then is are was were be been being am has have had do does did it its it's this that these those
he she they we you i him her them us me his hers their theirs our your my who whom whose which
what when where why how there here so such very not also just"""
STOPWORDS = frozenset(_FUNCTION_WORDS.split())
"""Function words that carry no answer content (a small English list)."""
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


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


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def answer_label(row: dict) -> str | None:
    """The class a probe decodes for a row: ``attribute=value`` where the row names its
    attribute (one probe then decodes every attribute's vocabulary; the attribute itself is
    plain in the question); else the answer's first lower-cased word that is neither a word
    of the question nor a stopword, None when it has none (such a row is not probed)."""
    if row.get("attribute"):
        return f"{row['attribute']}={row['answer']}"
    asked = set(_words(row.get("question", "")))
    return next((w for w in _words(row["answer"]) if w not in asked and w not in STOPWORDS), None)


def probe_labels(rows: Sequence[dict]) -> list[str | None]:
    """Each row's :func:`answer_label`."""
    return [answer_label(r) for r in rows]


def label_problem(
    retain_labels: Sequence[str | None], forget_labels: Sequence[str | None]
) -> str | None:
    """Why these labels cannot show a probe decoding anything, or None when they can: the
    retain rows a probe trains on need 2 classes of at least 2 rows each, and some forget
    label must be among the retain labels (a probe only names classes it was trained on)."""
    counts = Counter(y for y in retain_labels if y is not None)
    enough = sum(n >= 2 for n in counts.values())
    if enough < 2:
        return (
            f"the retain answers give {len(counts)} label classes, {enough} of them with 2 rows "
            "or more: a probe needs 2 such classes to learn anything"
        )
    if not counts.keys() & set(forget_labels):
        return (
            "no forget answer's label occurs among the retain answers' labels (e.g. unique "
            "answers): a probe can only name a class it was trained on"
        )
    return None


@_quietly
def probe_layer(
    X_retain: np.ndarray,
    retain_rows: Sequence[dict],
    X_forget: np.ndarray,
    forget_rows: Sequence[dict],
    C: float = 0.1,
    seed: int = 0,
) -> dict[str, float]:
    """Probe accuracies of one layer, on the rows with an :func:`answer_label`.

    ``probe_forget``: a probe trained on the retain questions, tested on the forget questions;
    ``probe_chance``: the same with shuffled training labels (measured chance);
    ``probe_retain_cv``: cross-validated accuracy on the retain questions (probe capacity);
    ``probe_coverage``: the share of forget labels that occur among the retain labels (a probe
    can only name a class it was trained on). Raises ValueError with the
    :func:`label_problem` of labels that carry no signal.
    """
    X_retain, y_retain, strata = _labelled(X_retain, retain_rows, "X_retain")
    X_forget, y_forget, _ = _labelled(X_forget, forget_rows, "X_forget")
    problem = label_problem(y_retain, y_forget)
    if problem:
        raise ValueError(problem)
    return {
        "probe_forget": transfer_accuracy(X_retain, y_retain, X_forget, y_forget, C, seed),
        "probe_chance": permutation_baseline(
            X_retain, y_retain, X_forget, y_forget, C, 3, seed, strata
        ),
        "probe_retain_cv": cv_accuracy(X_retain, y_retain, folds=3, C=C, seed=seed),
        "probe_coverage": float(np.mean([y in set(y_retain) for y in y_forget])),
    }


def _labelled(
    X: np.ndarray, rows: Sequence[dict], name: str
) -> tuple[np.ndarray, list[str], list[str]]:
    """The activations, labels and attributes (permutation strata) of the rows with a label."""
    X = _check(X, rows, name)
    labels = probe_labels(rows)
    keep = [i for i, y in enumerate(labels) if y is not None]
    return X[keep], [labels[i] for i in keep], [rows[i].get("attribute", "") for i in keep]
