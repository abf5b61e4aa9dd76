"""Recovery under quantization against its references: the unlearned model's gain beside the
never-learned control's and the original's change, on constructed per-fact scores."""

from __future__ import annotations

import numpy as np
import pytest
from test_verdict import FACTS, T, _case, _draw

from unlearning_audit.verdict import Evidence, Quantized, decide


def _quantized(seed: int, gain: float, control_gain: float, control: bool = True) -> Evidence:
    """The irreversible constructed case (forget score near 0.02 after unlearning), quantized:
    the unlearned model answers ``gain`` more of the forget facts, the control (unquantized
    near 0.05) ``control_gain`` more, the original loses a little (0.9 -> 0.85)."""
    e = _case(seed)
    rng = np.random.default_rng(100 + seed)
    unlearned = np.maximum(e.forget_unlearned, _draw(rng, gain, FACTS))
    control_before = _draw(rng, 0.05, FACTS)
    q = Quantized(
        unlearned=unlearned.tolist(),
        original=(np.asarray(e.forget_original) * _draw(rng, 0.94, FACTS)).tolist(),
        control=np.maximum(control_before, _draw(rng, control_gain, FACTS)).tolist()
        if control
        else None,
        control_unquantized=control_before if control else None,
    )
    return e.model_copy(update={"quantized": {"4": q}})


def _reason(v: dict) -> str:
    (line,) = [r for r in v["reasons"] if r.startswith("4-bit quantization")]
    return line


@pytest.mark.parametrize("seed", range(3))
def test_a_gain_equal_to_the_controls_is_no_recovery(seed):
    v = decide(_quantized(seed, gain=0.2, control_gain=0.2), T)
    q = v["quantization"]["4"]
    assert q["recovered"] is False
    assert q["excess"]["lower"] <= 0 <= q["excess"]["upper"]
    assert "no recovery under quantization beyond the control's gain" in _reason(v)
    assert v["regime"] == "irreversible"  # quantization stays beside the regime


@pytest.mark.parametrize("seed", range(3))
def test_a_gain_far_above_the_controls_is_recovery(seed):
    v = decide(_quantized(seed, gain=0.6, control_gain=0.05), T)
    q = v["quantization"]["4"]
    assert q["recovered"] is True and q["excess"]["lower"] > T.control_margin
    assert _reason(v).endswith(
        "recovery under quantization (the unlearned model gains beyond what quantization gives "
        "a model that never learned the facts)"
    )


def test_the_references_are_paired_per_fact_and_read_in_the_reason():
    """The excess is the difference of the two gains (a second formula: set means), every
    change lies inside its interval, and the reason states all three models' numbers."""
    e = _quantized(0, gain=0.4, control_gain=0.1)
    v = decide(e, T)
    q, raw = v["quantization"]["4"], e.quantized["4"]
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    rose = lambda after, before: mean(np.greater(after, before))  # noqa: E731 binary: 0 -> 1
    gains = {
        "unlearned": rose(raw.unlearned, e.forget_unlearned),
        "control": rose(raw.control, raw.control_unquantized),
        "original": mean(raw.original) - mean(e.forget_original),
    }
    for model, gain in gains.items():
        assert q[model]["gain"] == pytest.approx(gain)
        assert q[model]["lower"] <= gain <= q[model]["upper"]
    assert gains["original"] < 0  # quantization costs the original some of what it knew
    assert q["excess"]["mean"] == pytest.approx(gains["unlearned"] - gains["control"])
    line = _reason(v)
    named = {"unlearned": "the unlearned model", "control": "the never-learned control"}
    for model, name in (named | {"original": "the original"}).items():
        g, what = q[model], "change" if model == "original" else "gain"
        assert f"{name} {g['before']:.2f} -> {g['after']:.2f}, {what} {g['gain']:+.2f}" in line
    summary = v["evidence"]
    assert summary["forget_quantized_control"]["4"] == pytest.approx(mean(raw.control))
    assert summary["forget_quantized_original"]["4"] == pytest.approx(mean(raw.original))


def test_the_controls_lost_guesses_are_no_recovery():
    """The unlearned model answers nothing, before and after; quantization costs the control a
    third of its lucky guesses. Net changes would read +0.10 of recovery; rises read none."""
    e = _case(0)
    rng = np.random.default_rng(7)
    nothing = [0.0] * FACTS
    guesses = np.asarray(_draw(rng, 0.3, FACTS))
    kept = guesses * np.asarray(_draw(rng, 2 / 3, FACTS))
    q = Quantized(unlearned=nothing, control=kept.tolist(), control_unquantized=guesses.tolist())
    v = decide(e.model_copy(update={"forget_unlearned": nothing, "quantized": {"4": q}}), T)
    quantized = v["quantization"]["4"]
    assert np.mean(guesses - kept) > 0.05  # the control's net change is a clear loss
    assert quantized["excess"]["mean"] == 0.0 and quantized["recovered"] is False


def test_without_a_control_no_recovery_is_claimed():
    v = decide(_quantized(0, gain=0.6, control_gain=0.0, control=False), T)
    q = v["quantization"]["4"]
    assert q["recovered"] is None and q["excess"] is None and q["control"] is None
    assert q["unlearned"]["lower"] > 0  # a clear gain, yet no control to tell it from rounding
    assert "no recovery is claimed" in _reason(v)
