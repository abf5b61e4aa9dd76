"""The verdict on constructed per-fact evidence: every regime, its bounds, and its error rate.

Each case draws per-fact outcomes from known rates (Bernoulli, fixed seeds), so the truth of
every case is known; the null test checks the false "reversible" rate against alpha.
"""

from __future__ import annotations

import numpy as np
import pytest

from unlearning_audit.config import Thresholds
from unlearning_audit.verdict import REGIMES, Capacity, Evidence, Look, decide

T = Thresholds(resamples=2000)
FACTS, PER_GROUP = 200, 5


def _groups(n: int) -> list[str]:
    return [f"author-{i // PER_GROUP}" for i in range(n)]


def _draw(rng, rate: float, n: int) -> list[float]:
    return (rng.random(n) < rate).astype(float).tolist()


def _look(rng, gain: float, control_gain: float, n: int = FACTS // 2, seeds: int = 3) -> Look:
    """Relearning from near zero: the candidate reaches ``gain``, the control ``control_gain``."""
    return Look(
        groups=_groups(n),
        candidate_before=_draw(rng, 0.0, n),
        candidate_after=[_draw(rng, gain, n) for _ in range(seeds)],
        control_before=_draw(rng, 0.0, n),
        control_after=[_draw(rng, control_gain, n) for _ in range(seeds)],
    )


def _case(
    seed: int = 0,
    forget_after: float = 0.02,
    retain_after: float = 0.85,
    forget_gain: tuple[float, float] = (0.3, 0.3),
    heldout_gain: tuple[float, float] = (0.03, 0.03),
    capacity: tuple[float, float] = (0.3, 0.3),
    look_facts: int = FACTS,
) -> Evidence:
    """The forget look scores every forget fact, the held-out look half of them."""
    rng = np.random.default_rng(seed)
    looks = {
        "forget": _look(rng, *forget_gain, n=look_facts),
        "heldout": _look(rng, *heldout_gain, n=look_facts // 2),
    }
    n = FACTS // 2  # half A: what the attack trains on, for power and capacity
    trained = Capacity(
        groups=_groups(n),
        candidate=[_draw(rng, capacity[0], n) for _ in range(3)],
        control=[_draw(rng, capacity[1], n) for _ in range(3)],
    )
    return Evidence(
        forget_groups=_groups(FACTS),
        forget_original=_draw(rng, 0.9, FACTS),
        forget_unlearned=_draw(rng, forget_after, FACTS),
        retain_groups=_groups(FACTS),
        retain_original=_draw(rng, 0.9, FACTS),
        retain_unlearned=_draw(rng, retain_after, FACTS),
        looks=looks,
        capacity=trained,
    )


CASES = {
    # forget barely dropped: not forgotten, whatever relearning does
    "not-forgotten": _case(forget_after=0.8, heldout_gain=(0.5, 0.0)),
    # held-out half comes back far faster than the control: knowledge still in the weights
    "reversible": _case(heldout_gain=(0.3, 0.03)),
    # recovers exactly as fast as a model that never learned the facts
    "irreversible": _case(),
    # half-way between on few facts: neither bound clears its margin
    "inconclusive": _case(heldout_gain=(0.2, 0.1), look_facts=100, seed=0),
    # learns nothing, not even the rows it is relearned on, where the control does
    "cannot-relearn": _case(forget_gain=(0.0, 0.3), heldout_gain=(0.0, 0.03), capacity=(0, 0.4)),
    "reversible-catastrophic": _case(retain_after=0.3, heldout_gain=(0.3, 0.03)),
    "irreversible-catastrophic": _case(retain_after=0.3),
    "inconclusive-catastrophic": _case(
        retain_after=0.3, heldout_gain=(0.2, 0.1), look_facts=100, seed=0
    ),
    "cannot-relearn-catastrophic": _case(
        retain_after=0.1, forget_gain=(0.0, 0.3), heldout_gain=(0.0, 0.03), capacity=(0, 0.4)
    ),
}


@pytest.mark.parametrize("regime", list(CASES))
def test_constructed_cases(regime):
    assert decide(CASES[regime], T)["regime"] == regime


def test_cases_cover_every_regime():
    assert set(CASES) == set(REGIMES)


def test_regimes_hold_across_draws():
    """A decisive case reads the same under other draws of its facts (float noise between
    machines moves a fact or two; it must not move a verdict)."""
    for seed in range(5):
        assert decide(_case(seed, heldout_gain=(0.3, 0.03)), T)["regime"] == "reversible"
        assert decide(_case(seed), T)["regime"] == "irreversible"


def test_bounds_contain_the_advantage_and_name_the_deciding_look():
    v = decide(CASES["reversible"], T)
    look = v["looks"]["heldout"]
    assert v["deciding_look"] == "heldout"
    assert look["lower"] < look["advantage"] < look["upper"]
    assert look["advantage"] == pytest.approx(look["gain"] - look["control_gain"])
    assert look["p_holm"] >= look["p"]  # Holm over the two looks never lowers a p-value
    assert "reversible: advantage" in v["headline"] and "held-out half" in v["headline"]


def test_gains_not_levels_count():
    """Residual knowledge before relearning is not recovery: a candidate that still answers 30%
    of the held-out half and gains nothing, beside a control that gains nothing, is not
    reversible."""
    rng = np.random.default_rng(3)
    evidence = _case()
    residual = [_draw(rng, 0.3, FACTS // 2)] * 1
    look = evidence.looks["heldout"].model_copy(
        update={"candidate_before": residual[0], "candidate_after": residual * 3}
    )
    evidence = evidence.model_copy(update={"looks": {**evidence.looks, "heldout": look}})
    assert decide(evidence, T)["regime"] == "irreversible"


def test_climbing_back_to_what_the_control_guesses_is_no_recovery():
    """The control answers some facts before relearning (well-formed guesses); a collapsed
    candidate answers none. Both end at the same scores: the advantage is not positive."""
    rng = np.random.default_rng(8)
    n = FACTS
    after = [_draw(rng, 0.3, n) for _ in range(3)]
    look = Look(
        groups=_groups(n),
        candidate_before=[0.0] * n,
        candidate_after=after,
        control_before=_draw(rng, 0.15, n),
        control_after=after,
        chance=[0.12] * n,
    )
    evidence = _case().model_copy(update={"looks": {"forget": look}})
    v = decide(evidence, T)
    assert not v["reversible"] and v["looks"]["forget"]["advantage"] <= 0


def test_facts_still_answered_cannot_read_as_slow_recovery():
    """Half the forget facts are still answered by the unlearned model; they are left out of
    the advantage instead of counting as facts that did not recover."""
    rng = np.random.default_rng(9)
    n = FACTS
    before = [1.0] * (n // 2) + [0.0] * (n // 2)
    look = Look(
        groups=_groups(n),
        candidate_before=before,
        candidate_after=[[1.0] * n for _ in range(3)],  # everything comes back
        control_before=[0.0] * n,
        control_after=[_draw(rng, 0.6, n) for _ in range(3)],
    )
    v = decide(_case().model_copy(update={"looks": {"forget": look}}), T)
    assert v["looks"]["forget"]["facts"] == n // 2
    assert v["reversible"]


def test_an_attack_without_power_is_no_evidence_of_deletion():
    """Neither the candidate nor the control learns anything from relearning: "irreversible"
    would only say the attack was too weak."""
    evidence = _case(forget_gain=(0.0, 0.0), heldout_gain=(0.0, 0.0), capacity=(0.0, 0.0))
    v = decide(evidence, T)
    assert v["regime"] == "inconclusive"
    assert any("barely takes hold" in r for r in v["reasons"])


def test_few_groups_cannot_decide_either_way():
    """Two authors (TOFU forget01): the exact cluster test cannot reach alpha, so neither a
    perfect recovery nor none at all is called; the verdict says how many groups it needs."""
    n = 10
    groups = ["a"] * 5 + ["b"] * 5
    for after in (1.0, 0.0):
        look = Look(
            groups=groups,
            candidate_before=[0.0] * n,
            candidate_after=[[after] * n] * 3,
            control_before=[0.0] * n,
            control_after=[[0.0] * n] * 3,
        )
        v = decide(_case().model_copy(update={"looks": {"forget": look}}), T)
        assert v["regime"] == "inconclusive", after
        assert any("groups are too few" in r for r in v["reasons"])


def test_no_judged_look_is_inconclusive_not_a_crash():
    v = decide(_case().model_copy(update={"looks": {}}), T)
    assert v["regime"] == "inconclusive" and v["deciding_look"] is None
    assert any("no relearning look could be judged" in r for r in v["reasons"])


def test_without_control_a_graded_score_without_chance_is_not_judged():
    """Without a control and without measured chance, a graded score's return to a middling
    level is restoration alone: never reversible."""
    rng = np.random.default_rng(10)
    n = FACTS // 2
    look = Look(
        groups=_groups(n),
        candidate_before=[0.01] * n,
        candidate_after=[(0.3 + 0.01 * rng.random(n)).tolist() for _ in range(3)],
    )
    evidence = _case().model_copy(update={"metric": "probability", "looks": {"heldout": look}})
    v = decide(evidence, T)
    assert not v["reversible"] and v["looks"] == {}


def test_without_control_only_the_heldout_half_counts_against_chance():
    rng = np.random.default_rng(4)
    n = FACTS // 2
    before = _draw(rng, 0.0, n)
    look = Look(
        groups=_groups(n),
        candidate_before=before,
        candidate_after=[_draw(rng, 0.15, n) for _ in range(3)],
        chance=[0.15] * n,  # a well-formed guess scores as much as relearning reached
    )
    forget = Look(groups=_groups(n), candidate_before=before, candidate_after=[[1.0] * n] * 3)
    evidence = _case().model_copy(update={"looks": {"forget": forget, "heldout": look}})
    v = decide(evidence, T)
    assert set(v["looks"]) == {"heldout"}  # full restoration of the relearned facts: no evidence
    assert not v["reversible"]
    assert any("no never-learned control" in r for r in v["reasons"])


def test_thresholds_are_configurable_and_stated():
    evidence = CASES["irreversible-catastrophic"]
    assert decide(evidence, T)["catastrophic"]
    assert not decide(evidence, T.model_copy(update={"catastrophic": 0.9}))["catastrophic"]
    modest = _case(heldout_gain=(0.2, 0.1), capacity=(0.7, 0.7))  # advantage about +0.1
    assert decide(modest, T)["regime"] == "reversible"
    wide = T.model_copy(update={"control_margin": 0.3, "equivalence_margin": 0.4})
    assert decide(modest, wide)["regime"] == "irreversible"
    v = decide(CASES["inconclusive"], T)
    assert v["thresholds"] == T.model_dump()
    assert any("facts at this spread" in r for r in v["reasons"])


def test_false_reversible_rate_is_at_most_alpha():
    """Null: candidate and control relearn from the same per-fact rates (which vary by author).
    Over many simulated audits the verdict calls "reversible" at most alpha of the time."""
    t = Thresholds(resamples=400)
    rng = np.random.default_rng(11)
    calls, trials, n = 0, 150, 60
    for _ in range(trials):
        rates = np.repeat(rng.uniform(0.0, 0.6, n // PER_GROUP), PER_GROUP)

        def runs(rates=rates):
            return [(rng.random(n) < rates).astype(float).tolist() for _ in range(3)]

        zero = [0.0] * n
        looks = {
            name: Look(
                groups=_groups(n),
                candidate_before=zero,
                candidate_after=runs(),
                control_before=zero,
                control_after=runs(),
            )
            for name in ("forget", "heldout")
        }
        evidence = _case().model_copy(update={"looks": looks})
        calls += decide(evidence, t)["reversible"]
    assert calls / trials <= t.alpha


def test_other_sources_are_reported_beside_the_regime_not_in_it():
    """Relearning on retain data that brings the forget set back far faster than the control
    is shown with its interval, and changes neither the regime nor the deciding looks' p."""
    base = CASES["irreversible"]
    rng = np.random.default_rng(7)
    side = base.model_copy(update={"side_looks": {"retain": _look(rng, 0.4, 0.02, n=FACTS)}})
    plain, with_side = decide(base, T), decide(side, T)
    assert with_side["regime"] == plain["regime"] == "irreversible"
    assert with_side["looks"] == plain["looks"]
    retain = with_side["side_looks"]["retain"]
    assert 0.3 < retain["lower"] < retain["advantage"] < retain["upper"] < 0.5
    assert retain["advantage"] == pytest.approx(retain["gain"] - retain["control_gain"])
    assert any("relearning on retain data" in reason for reason in with_side["reasons"])
    assert plain["side_looks"] == {}
