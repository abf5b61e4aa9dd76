"""The verdict: four regimes (DESIGN.md, "Verdict"), every threshold configurable and stated.

With E the exact match on a set, p0 the original, pu the unlearned and pr the relearned model:

* forgotten:    E(p0, forget) - E(pu, forget) >= forgotten * E(p0, forget); else not forgotten;
* catastrophic: retain exact match fell by more than ``catastrophic`` relative to E(p0, retain);
* reversible:   E(pr, forget) >= reversible * E(p0, forget), or the unlearned model recovers at
  least ``control_margin`` beyond the never-learned control under the same budget, on the whole
  forget set or on the held-out half it was not relearned on. Else irreversible.

The other recovery attacks, quantization and linear probes, are reported as evidence beside the
regime (how much forget exact match returns under quantization; how far above measured chance a
probe decodes the forget answers), without changing it.
"""

from __future__ import annotations

from pydantic import BaseModel

from .config import Thresholds

# Exact-match rates are ratios k/n: compare with a tolerance so "at the threshold" is exact.
EPS = 1e-9
REGIMES = (
    "reversible",
    "irreversible",
    "reversible-catastrophic",
    "irreversible-catastrophic",
    "not-forgotten",
)


class Evidence(BaseModel):
    """Token-level outcomes a verdict rests on (exact match, 0..1); None where not measured."""

    forget_original: float
    forget_unlearned: float
    forget_relearned: float
    retain_original: float
    retain_unlearned: float
    heldout_relearned: float | None = None
    control_relearned: float | None = None
    control_heldout: float | None = None
    forget_quantized: dict[str, float] = {}
    probe_layer: int | None = None
    probe_forget_unlearned: float | None = None
    probe_chance: float | None = None
    probe_forget_original: float | None = None


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def decide(evidence: Evidence, thresholds: Thresholds) -> dict:
    """The regime and the quantities and reasons behind it."""
    e, t = evidence, thresholds
    forget_drop = e.forget_original - e.forget_unlearned
    forgotten = e.forget_original > 0 and forget_drop >= t.forgotten * e.forget_original - EPS
    retain_drop = (
        (e.retain_original - e.retain_unlearned) / e.retain_original if e.retain_original else 0.0
    )
    catastrophic = retain_drop > t.catastrophic + EPS
    restored = e.forget_relearned >= t.reversible * e.forget_original - EPS
    advantage = _difference(e.forget_relearned, e.control_relearned)
    heldout_advantage = _difference(e.heldout_relearned, e.control_heldout)
    beyond_control = any(
        a is not None and a >= t.control_margin - EPS for a in (advantage, heldout_advantage)
    )
    reversible = restored or beyond_control
    reasons = [
        f"forget exact match {e.forget_original:.2f} -> {e.forget_unlearned:.2f} "
        f"({'forgotten' if forgotten else 'not forgotten'}: threshold {t.forgotten:.0%} lost)",
        f"retain exact match fell {retain_drop:.0%} (catastrophic above {t.catastrophic:.0%})",
        f"relearning restored forget exact match to {e.forget_relearned:.2f} "
        f"({'>=' if restored else '<'} {t.reversible:.0%} of the original)",
    ]
    if advantage is not None:
        reasons.append(
            f"recovery beyond the never-learned control: {advantage:+.2f} on the "
            f"forget set, {_fmt(heldout_advantage)} on the held-out half "
            f"(margin {t.control_margin:.2f})"
        )
    quantization_recovery = max(
        (em - e.forget_unlearned for em in e.forget_quantized.values()), default=None
    )
    for bits, em in sorted(e.forget_quantized.items(), key=lambda kv: -int(kv[0])):
        reasons.append(
            f"{bits}-bit quantization of the unlearned model: forget exact match "
            f"{e.forget_unlearned:.2f} -> {em:.2f}"
        )
    probe_advantage = _difference(e.probe_forget_unlearned, e.probe_chance)
    if probe_advantage is not None:
        reasons.append(
            f"a linear probe decodes {e.probe_forget_unlearned:.2f} of forget answers from the "
            f"unlearned model (layer {e.probe_layer}; measured chance {e.probe_chance:.2f}, "
            f"original {e.probe_forget_original or 0:.2f})"
        )
    if not forgotten:
        regime = "not-forgotten"
    else:
        regime = ("reversible" if reversible else "irreversible") + (
            "-catastrophic" if catastrophic else ""
        )
    return {
        "regime": regime,
        "forgotten": forgotten,
        "catastrophic": catastrophic,
        "reversible": reversible,
        "restored_by_relearning": restored,
        "beyond_control": beyond_control,
        "retain_drop": retain_drop,
        "recovery_advantage": advantage,
        "heldout_advantage": heldout_advantage,
        "quantization_recovery": quantization_recovery,
        "probe_advantage": probe_advantage,
        "reasons": reasons,
        "evidence": evidence.model_dump(),
        "thresholds": thresholds.model_dump(),
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"
