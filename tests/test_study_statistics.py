"""Study-level statistics on constructed runs: false discovery control and metric prediction."""

from __future__ import annotations

import numpy as np
import pytest

from unlearning_audit import study
from unlearning_audit.report import study_markdown


def _row(label, regime, p, advantage, cka, domain="text"):
    return {
        "label": label,
        "domain": domain,
        "regime": regime,
        "p": p,
        "advantage": advantage,
        "heldout_advantage": advantage,
        "advantage_lower": advantage - 0.05,
        "advantage_upper": advantage + 0.05,
        "look": "heldout",
        "mean_cka": cka,
        "mean_pca_distance": 1 - cka,
        "fisher_ratio": float("nan"),
        "weight_change": 0.1,
        "method": label,
        "lr": 1e-3,
        "metric": "exact_match",
        "forget_original": 0.9,
        "forget_unlearned": 0.05,
        "forget_relearned": 0.5,
        "retain_original": 0.9,
        "retain_unlearned": 0.8,
    }


def test_benjamini_hochberg_drops_the_weak_reversible_calls():
    """Hand-worked: p = 0.001, 0.02, 0.04, 0.9 over 4 runs give q = 0.004, 0.04, 0.0533, 0.9;
    at FDR 0.05 the third reversible call (p = 0.04, a pass on its own) does not survive."""
    rows = [
        _row("a", "reversible", 0.001, 0.3, 0.9),
        _row("b", "reversible", 0.02, 0.2, 0.8),
        _row("c", "reversible-catastrophic", 0.04, 0.1, 0.7),
        _row("d", "irreversible", 0.9, 0.0, 0.5),
    ]
    calls = study.false_discoveries(rows, alpha=0.05)
    assert [round(c["q"], 4) for c in calls] == [0.004, 0.04, 0.0533, 0.9]
    assert [c["survives"] for c in calls] == [True, True, False, False]


def test_a_separating_metric_reads_auroc_one_and_a_useless_one_reads_chance():
    rng = np.random.default_rng(0)
    rows = [_row(f"r{i}", "reversible", 0.001, 0.3 + 0.01 * i, 0.8 + 0.01 * i) for i in range(8)]
    rows += [_row(f"i{i}", "irreversible", 0.9, 0.01 * i, 0.5 + 0.01 * i) for i in range(8)]
    for r in rows:
        r["weight_change"] = float(rng.random())  # unrelated to the regime
    found = {p["metric"]: p for p in study.predictors(rows, alpha=0.05, resamples=500)}
    cka = found["mean CKA"]
    assert cka["runs"] == 16 and cka["reversible"] == 8
    assert cka["auroc"][0] == pytest.approx(1.0) and cka["auroc"][1] > 0.9
    assert cka["spearman"][0] == pytest.approx(1.0)
    assert found["mean PCA distance"]["auroc"][0] == pytest.approx(0.0)  # 1 - CKA: reversed
    weight = found["weight change"]["auroc"]
    assert weight[1] < 0.5 < weight[2]  # its interval spans chance
    fisher = found["Fisher ratio (empirical)"]
    assert fisher["runs"] == 0  # NaN metrics are left out, not read as values
    assert np.isnan(fisher["auroc"]).all()


def test_study_report_states_fdr_and_predictors():
    rows = [_row("a", "reversible", 0.001, 0.3, 0.9), _row("b", "irreversible", 0.8, 0.0, 0.4)]
    text = study_markdown(rows, {"alpha": 0.05, "resamples": 200})
    assert "1 of 1 reversible calls survive Benjamini-Hochberg" in text
    assert "AUROC [interval]" in text and "mean CKA" in text
