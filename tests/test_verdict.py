"""The verdict on constructed cases covering every regime and threshold edge."""

from __future__ import annotations

import pytest

from unlearning_audit.config import Thresholds
from unlearning_audit.verdict import REGIMES, Evidence, decide

T = Thresholds()  # forgotten 0.5, catastrophic 0.2, reversible 0.8, control margin 0.1


def _case(fu, fr, ru, held=None, ctrl=None, ctrl_held=None, f0=0.9, r0=0.9):
    return Evidence(
        forget_original=f0,
        forget_unlearned=fu,
        forget_relearned=fr,
        retain_original=r0,
        retain_unlearned=ru,
        heldout_relearned=held,
        control_relearned=ctrl,
        control_heldout=ctrl_held,
    )


CASES = [
    # forget barely dropped: not forgotten, whatever relearning does
    ("not-forgotten", _case(fu=0.6, fr=0.9, ru=0.9)),
    # forgotten, retain kept, relearning restores >= 80% of the original: reversible
    ("reversible", _case(fu=0.1, fr=0.8, ru=0.85)),
    # forgotten, not restored, but clearly beyond the control on the held-out half
    ("reversible", _case(fu=0.0, fr=0.3, ru=0.85, held=0.25, ctrl=0.3, ctrl_held=0.05)),
    # forgotten, recovers no faster than the never-learned control: irreversible
    ("irreversible", _case(fu=0.0, fr=0.2, ru=0.85, held=0.0, ctrl=0.2, ctrl_held=0.0)),
    # retain collapsed too
    ("reversible-catastrophic", _case(fu=0.0, fr=0.85, ru=0.3)),
    ("irreversible-catastrophic", _case(fu=0.0, fr=0.0, ru=0.1, held=0.0, ctrl=0.4, ctrl_held=0.3)),
]


@pytest.mark.parametrize(("regime", "evidence"), CASES)
def test_constructed_cases(regime, evidence):
    assert decide(evidence, T)["regime"] == regime


def test_cases_cover_every_regime():
    assert {regime for regime, _ in CASES} == set(REGIMES)


def test_thresholds_are_edges_and_configurable():
    at_half = _case(fu=0.45, fr=0.0, ru=0.9)  # exactly half of 0.9 lost: forgotten
    assert decide(at_half, T)["forgotten"]
    assert not decide(at_half, Thresholds(forgotten=0.6))["forgotten"]
    retain_20 = _case(fu=0.0, fr=0.0, ru=0.72)  # exactly 20% relative drop: not catastrophic
    assert not decide(retain_20, T)["catastrophic"]
    assert decide(retain_20, Thresholds(catastrophic=0.1))["catastrophic"]
    margin = _case(fu=0.0, fr=0.3, ru=0.9, held=0.1, ctrl=0.25, ctrl_held=0.0)
    assert decide(margin, T)["reversible"]  # +0.1 on the held-out half meets the margin
    assert not decide(margin, Thresholds(control_margin=0.2))["reversible"]


def test_verdict_states_its_evidence_thresholds_and_reasons():
    result = decide(CASES[2][1], T)
    assert result["thresholds"] == T.model_dump()
    assert result["heldout_advantage"] == pytest.approx(0.2)
    assert result["recovery_advantage"] == pytest.approx(0.0)
    assert any("never-learned control" in reason for reason in result["reasons"])
