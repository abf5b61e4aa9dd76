"""Statistics across a study's runs (DESIGN.md, "Verdict": study level).

* False discoveries: a study makes many "reversible" calls, each at level alpha; Benjamini-
  Hochberg over the runs' reversibility p-values says which calls survive at false discovery
  rate alpha.
* Does a representation metric predict reversibility? Per domain, over the runs that forgot and
  were judged (reversible against irreversible, cannot-relearn counted with the irreversible):
  AUROC of the metric for the reversible label, and Spearman correlation of the metric with the
  advantage over the control on the held-out half (the forget set where a run has no held-out
  look), each with a bootstrap interval over runs. Few runs give wide intervals, and the table
  says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from . import stats

MIN_CLASS = 3
"""Runs each label needs before an AUROC (and its interval) is shown: with fewer, every
resample separates the classes perfectly or not at all."""
PREDICTORS = {
    "mean_cka": "mean CKA",
    "mean_pca_distance": "mean PCA distance",
    "fisher_ratio": "Fisher ratio (empirical)",
    "fisher_ratio_model": "Fisher ratio (model)",
    "weight_change": "weight change",
    "depth_share_top1": "depth share (top block + head)",
    "splice_restored_top1": "splice restored (top block)",
}


def grid(rows: Sequence[dict]) -> list[dict]:
    """The grid's runs, without the reruns under further seeds that check an irreversible,
    undamaged run (``confirmation``): counted, they would weigh one setting several times,
    and only settings that read irreversible."""
    return [r for r in rows if not r.get("confirmation")]


def false_discoveries(rows: Sequence[dict], alpha: float) -> list[dict]:
    """Each grid run's reversibility p-value (Holm over its looks) and its Benjamini-Hochberg
    q-value over every run that has one; ``survives`` where a reversible call has q <= alpha."""
    rows = grid(rows)
    tested = [r for r in rows if r.get("p") is not None]
    qs = stats.benjamini_hochberg([r["p"] for r in tested])
    q_of = {id(r): q for r, q in zip(tested, qs, strict=True)}
    return [
        {
            "label": r["label"],
            "domain": r.get("domain"),
            "regime": r["regime"],
            "p": r.get("p"),
            "q": q_of.get(id(r)),
            "survives": r["regime"].startswith("reversible") and q_of.get(id(r), 1.0) <= alpha,
        }
        for r in rows
    ]


def predictors(rows: Sequence[dict], alpha: float, resamples: int, seed: int = 0) -> list[dict]:
    """Per domain and metric: AUROC for reversible vs irreversible and Spearman with the
    advantage, each as (value, lower, upper) with a (1 - 2 alpha) bootstrap interval."""
    out = []
    rows = grid(rows)
    for domain in sorted({r.get("domain") or "" for r in rows}):
        judged = [
            r
            for r in rows
            if (r.get("domain") or "") == domain
            and r["regime"].startswith(("reversible", "irreversible", "cannot-relearn"))
            and _advantage(r) is not None
        ]
        for key, name in PREDICTORS.items():
            usable = [r for r in judged if _finite(r.get(key))]
            x = np.array([r[key] for r in usable], dtype=float)
            label = np.array([r["regime"].startswith("reversible") for r in usable], dtype=float)
            gain = np.array([_advantage(r) for r in usable], dtype=float)
            out.append(
                {
                    "domain": domain,
                    "metric": name,
                    "runs": len(usable),
                    "reversible": int(label.sum()),
                    "auroc": interval(stats.auroc, (x, label), alpha, resamples, seed)
                    if min(label.sum(), len(label) - label.sum()) >= MIN_CLASS
                    else [math.nan] * 3,
                    "spearman": interval(stats.spearman, (x, gain), alpha, resamples, seed),
                }
            )
    return out


def _advantage(row: dict) -> float | None:
    """One look for every run: the held-out half's advantage, else the forget set's."""
    for key in ("heldout_advantage", "forget_advantage"):
        if _finite(row.get(key)):
            return row[key]
    return None


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def interval(statistic, arrays, alpha: float, resamples: int, seed: int) -> list[float]:
    """(value, lower, upper), NaN where fewer than three runs leave nothing to estimate."""
    if len(arrays[0]) < 3:
        return [math.nan] * 3
    return list(stats.bootstrap_statistic(statistic, arrays, alpha, resamples, seed))
