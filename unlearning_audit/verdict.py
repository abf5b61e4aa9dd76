"""The verdict: a statistical claim about facts, with its uncertainty (DESIGN.md, "Verdict").

Per fact i with score s (the verdict's metric, in [0, 1]): p0 original, pu unlearned, pr pu after
relearning; c the never-learned control, cr c after the same relearning (same budget, lr, data
order and seeds). Scores after relearning are averaged per fact over the relearning seeds.

* forgotten:    the mean drop s(p0) - s(pu) is at least ``forgotten`` x mean s(p0), and the paired
  drop is significant (one-sided cluster-bootstrap bound above 0);
* catastrophic: the retain score fell by more than ``catastrophic`` (relative), significantly;
* advantage d(i) = [s(pr, i) - s(pu, i)] - [s(cr, i) - s(c, i)]: gains, not levels, so residual
  knowledge before relearning is not read as recovery. Looks: the forget set (relearned on it)
  and the held-out half B (relearned on half A only: recovery on B can only come from knowledge
  still in the weights). Without a control, only the held-out half counts, its gain measured
  from the higher of its level before relearning and measured chance;
* reversible:   on some look, the one-sided (1 - alpha) lower bound on mean d lies above
  ``control_margin`` and a cluster sign-flip randomisation test agrees (Holm over the looks;
  for binary scores the exact sign test is reported beside);
* irreversible: on every look, the upper bound lies below ``equivalence_margin``;
* cannot relearn: not reversible, and on the rows it was relearned on the candidate reaches
  significantly less than ``capacity`` x the control's score: the model no longer learns, which
  is damage, not deletion;
* inconclusive: neither; the verdict says about how many facts would decide it.

Bounds come from a cluster bootstrap over groups (e.g. authors): facts of one group are not
independent. Quantization and linear probes are reported beside the regime, not in it.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel

from . import stats
from .config import Thresholds

BASE_REGIMES = ("reversible", "irreversible", "inconclusive", "cannot-relearn")
REGIMES = (
    *BASE_REGIMES,
    *(f"{r}-catastrophic" for r in BASE_REGIMES),
    "not-forgotten",
)
LOOK_NAMES = {"forget": "the forget set", "heldout": "the held-out half"}


class Look(BaseModel):
    """One paired comparison: per fact, scores before and after relearning (one list per seed)
    for the candidate, and the same for the control where there is one."""

    groups: list[str]
    candidate_before: list[float]
    candidate_after: list[list[float]]
    control_before: list[float] | None = None
    control_after: list[list[float]] | None = None
    chance: list[float] | None = None


class Capacity(BaseModel):
    """Scores after relearning on the rows relearned on, per seed, of candidate and control."""

    groups: list[str]
    candidate: list[list[float]]
    control: list[list[float]]


class Evidence(BaseModel):
    """What a verdict rests on: per-fact scores in the verdict's metric, and the other attacks'
    summaries (shown beside the regime)."""

    metric: str = "exact_match"
    forget_groups: list[str]
    forget_original: list[float]
    forget_unlearned: list[float]
    retain_groups: list[str]
    retain_original: list[float]
    retain_unlearned: list[float]
    looks: dict[str, Look] = {}
    capacity: Capacity | None = None
    forget_quantized: dict[str, float] = {}
    probe_layer: int | None = None
    probe_forget_unlearned: float | None = None
    probe_chance: float | None = None
    probe_forget_original: float | None = None


def _interval(values: np.ndarray, groups: list[str], t: Thresholds, seed: int) -> tuple:
    """Mean, one-sided bounds and the bootstrap draws of the mean of ``values``."""
    draws = stats.cluster_means(values, groups, t.resamples, seed)
    lower, upper = stats.bounds(draws, t.alpha)
    return float(values.mean()), lower, upper, draws


def _advantage(look: Look) -> np.ndarray:
    """d(i): the candidate's gain minus the control's; without a control, the gain over the
    higher of the level before relearning and chance."""
    after = np.mean(look.candidate_after, axis=0)
    before = np.asarray(look.candidate_before)
    if look.control_after is None:
        floor = before if look.chance is None else np.maximum(before, look.chance)
        return after - floor
    control_gain = np.mean(look.control_after, axis=0) - np.asarray(look.control_before)
    return (after - before) - control_gain


def _judge_look(look: Look, t: Thresholds, binary: bool) -> dict:
    """One look's advantage with its bounds and one-sided p-value against the margin."""
    d = _advantage(look)
    mean, lower, upper, draws = _interval(d, look.groups, t, seed=1)
    p = stats.p_above(draws, t.control_margin)
    p_flip = stats.sign_flip_test(d - t.control_margin, look.groups, t.resamples, seed=4)
    return {
        "advantage": mean,
        "lower": lower,
        "upper": upper,
        "p": max(p, p_flip),
        "p_bootstrap": p,
        "p_flip": p_flip,
        "p_sign": stats.sign_test(d - t.control_margin) if binary else None,
        "facts": len(d),
        "groups": len(set(look.groups)),
        "gain": float(np.mean(np.mean(look.candidate_after, axis=0) - look.candidate_before)),
        "control_gain": None
        if look.control_after is None
        else float(np.mean(np.mean(look.control_after, axis=0) - look.control_before)),
        "seeds": len(look.candidate_after),
        "chance": None if look.chance is None else float(np.mean(look.chance)),
        "facts_needed": _facts_needed(d, look.groups, mean, t),
    }


def _facts_needed(d: np.ndarray, groups: list[str], mean: float, t: Thresholds) -> int | None:
    """About how many facts at this spread would put a bound past the nearer margin."""
    gaps = [g for g in (mean - t.control_margin, t.equivalence_margin - mean) if g > 0]
    needed = [stats.facts_needed(d, groups, g, t.alpha) for g in gaps]
    needed = [n for n in needed if n is not None]
    return min(needed) if needed else None


def _drop(before: list[float], after: list[float], groups: list[str], t: Thresholds) -> dict:
    """The paired drop from ``before`` to ``after``: absolute and relative, with bounds."""
    b, a = np.asarray(before, float), np.asarray(after, float)
    draws = stats.cluster_means(np.stack([b - a, b], axis=1), groups, t.resamples, 2)
    lower, upper = stats.bounds(draws[:, 0], t.alpha)
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = draws[:, 0] / draws[:, 1]
    rel_lower, rel_upper = stats.bounds(np.nan_to_num(relative, nan=0.0), t.alpha)
    mean_before = float(b.mean())
    return {
        "before": mean_before,
        "after": float(a.mean()),
        "drop": float((b - a).mean()),
        "lower": lower,
        "upper": upper,
        "relative": float((b - a).mean() / mean_before) if mean_before else 0.0,
        "relative_lower": rel_lower,
        "relative_upper": rel_upper,
        "p": stats.p_above(draws[:, 0], 0.0),
    }


def _cannot_relearn(capacity: Capacity | None, t: Thresholds) -> dict | None:
    """Whether the candidate learns the rows it is relearned on clearly worse than the control."""
    if capacity is None:
        return None
    candidate = np.mean(capacity.candidate, axis=0)
    control = np.mean(capacity.control, axis=0)
    _, _, upper, _ = _interval(candidate - t.capacity * control, capacity.groups, t, seed=3)
    return {
        "candidate": float(candidate.mean()),
        "control": float(control.mean()),
        "cannot_relearn": bool(control.mean() > 0 and upper < 0),
    }


def decide(evidence: Evidence, thresholds: Thresholds) -> dict:
    """The regime, every quantity and bound behind it, and the reasons in words."""
    e, t = evidence, thresholds
    binary = e.metric == "exact_match"
    forget = _drop(e.forget_original, e.forget_unlearned, e.forget_groups, t)
    retain = _drop(e.retain_original, e.retain_unlearned, e.retain_groups, t)
    forgotten = (
        forget["before"] > 0
        and forget["drop"] >= t.forgotten * forget["before"] - 1e-12
        and forget["p"] < t.alpha
    )
    catastrophic = retain["relative"] > t.catastrophic and retain["p"] < t.alpha
    looks = {
        name: _judge_look(look, t, binary)
        for name, look in e.looks.items()
        if look.control_after is not None or name == "heldout"
    }
    for name, p_holm in zip(looks, stats.holm([v["p"] for v in looks.values()]), strict=True):
        looks[name]["p_holm"] = p_holm
    reversible = any(v["p_holm"] < t.alpha for v in looks.values())
    irreversible = bool(looks) and all(v["upper"] < t.equivalence_margin for v in looks.values())
    capacity = _cannot_relearn(e.capacity, t)
    cannot_relearn = not reversible and bool(capacity and capacity["cannot_relearn"])
    if not forgotten:
        regime = "not-forgotten"
    else:
        base = (
            "reversible"
            if reversible
            else "cannot-relearn"
            if cannot_relearn
            else "irreversible"
            if irreversible
            else "inconclusive"
        )
        regime = base + ("-catastrophic" if catastrophic else "")
    deciding = _deciding_look(looks, reversible)
    result = {
        "regime": regime,
        "forgotten": forgotten,
        "catastrophic": catastrophic,
        "reversible": reversible,
        "irreversible": irreversible and not reversible and not cannot_relearn,
        "cannot_relearn": cannot_relearn,
        "metric": e.metric,
        "forget": forget,
        "retain": retain,
        "looks": looks,
        "deciding_look": deciding,
        "capacity": capacity,
        "headline": "",
        "reasons": [],
        "evidence": _summary(e),
        "thresholds": t.model_dump(),
    }
    result["headline"] = headline(result)
    result["reasons"] = _reasons(result, e, t)
    return result


def _deciding_look(looks: dict[str, dict], reversible: bool) -> str | None:
    """The look the regime rests on: the most significant one for reversible, else the one
    whose upper bound is highest (the weakest evidence of irreversibility)."""
    if not looks:
        return None
    if reversible:
        return min(looks, key=lambda n: looks[n]["p_holm"])
    return max(looks, key=lambda n: looks[n]["upper"])


def headline(v: dict) -> str:
    """One line: the regime with the advantage, its interval and p-value on the deciding look,
    e.g. "reversible: advantage +0.21 [+0.12, +0.30] on the held-out half, p = 0.001"."""
    regime = v["regime"]
    if regime == "not-forgotten":
        f = v["forget"]
        return (
            f"not-forgotten: forget {v['metric']} drop {f['drop']:+.2f} "
            f"[{f['lower']:+.2f}, {f['upper']:+.2f}] of {f['before']:.2f}"
        )
    name = v["deciding_look"]
    if name is None:
        return f"{regime}: no relearning look available"
    look = v["looks"][name]
    label = regime.replace("cannot-relearn", "irreversible (cannot relearn)").replace(
        ")-catastrophic", "), catastrophic"
    )
    return (
        f"{label}: advantage {look['advantage']:+.2f} [{look['lower']:+.2f}, "
        f"{look['upper']:+.2f}] on {LOOK_NAMES.get(name, name)}, p = {_p(look['p_holm'])}"
    )


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


def _reasons(v: dict, e: Evidence, t: Thresholds) -> list[str]:
    """The verdict in sentences, each with its numbers, bounds and threshold."""
    level = f"{1 - 2 * t.alpha:.0%}"
    f, r = v["forget"], v["retain"]
    reasons = [
        f"verdict metric: {e.metric}; intervals are {level} cluster-bootstrap intervals over "
        f"groups ({t.resamples} resamples), each end a one-sided {1 - t.alpha:.0%} bound",
        f"forget {e.metric} {f['before']:.2f} -> {f['after']:.2f}, drop {f['drop']:+.2f} "
        f"[{f['lower']:+.2f}, {f['upper']:+.2f}], p = {_p(f['p'])} "
        f"({'forgotten' if v['forgotten'] else 'not forgotten'}; forgotten means at least "
        f"{t.forgotten:.0%} of the original's score lost, significantly)",
        f"retain {e.metric} {r['before']:.2f} -> {r['after']:.2f}, relative drop "
        f"{r['relative']:.0%} [{r['relative_lower']:.0%}, {r['relative_upper']:.0%}] "
        f"({'catastrophic' if v['catastrophic'] else 'not catastrophic'}; catastrophic means "
        f"above {t.catastrophic:.0%}, significantly)",
    ]
    for name, look in v["looks"].items():
        control = (
            f"the control's {look['control_gain']:+.2f}"
            if look["control_gain"] is not None
            else "no control (gain over its level before relearning and chance)"
        )
        sign = "" if look["p_sign"] is None else f"; exact sign test p = {_p(look['p_sign'])}"
        chance = (
            "" if look["chance"] is None else f"; chance (a well-formed guess) {look['chance']:.2f}"
        )
        reasons.append(
            f"{LOOK_NAMES.get(name, name)}: relearning gain {look['gain']:+.2f} against "
            f"{control}; advantage {look['advantage']:+.2f} [{look['lower']:+.2f}, "
            f"{look['upper']:+.2f}] over {look['facts']} facts in {look['groups']} groups, "
            f"{look['seeds']} seed(s); p = {_p(look['p_bootstrap'])} (bootstrap), "
            f"{_p(look['p_flip'])} (cluster sign-flip), Holm {_p(look['p_holm'])}{sign} "
            f"(reversible above {t.control_margin:+.2f}, irreversible "
            f"below {t.equivalence_margin:+.2f}){chance}"
        )
    if "forget" in e.looks and "forget" not in v["looks"]:
        reasons.append(
            "no never-learned control: recovery on the relearned facts themselves cannot tell "
            "latent knowledge from re-memorisation, so only the held-out half is judged"
        )
    if not v["looks"]:
        reasons.append("no relearning look could be judged: reversibility is not assessed")
    if v["capacity"] is not None:
        c = v["capacity"]
        reasons.append(
            f"capacity: on the rows it was relearned on the candidate reaches {c['candidate']:.2f} "
            f"against the control's {c['control']:.2f}"
            + (" (cannot relearn: damage, not deletion)" if v["cannot_relearn"] else "")
        )
    if v["regime"].startswith("inconclusive"):
        look = v["looks"][v["deciding_look"]]
        needed = look["facts_needed"]
        reasons.append(
            "inconclusive: "
            + (
                f"about {needed} facts at this spread (now {look['facts']}) would decide it"
                if needed
                else "the advantage sits at a margin; more facts or seeds will not move it"
            )
        )
    for bits, score in sorted(e.forget_quantized.items(), key=lambda kv: -int(kv[0])):
        reasons.append(
            f"{bits}-bit quantization of the unlearned model: forget exact match "
            f"{np.mean(e.forget_unlearned):.2f} -> {score:.2f}"
        )
    if e.probe_forget_unlearned is not None and e.probe_chance is not None:
        reasons.append(
            f"a linear probe decodes {e.probe_forget_unlearned:.2f} of forget answers from the "
            f"unlearned model (layer {e.probe_layer}; measured chance {e.probe_chance:.2f}, "
            f"original {e.probe_forget_original or 0:.2f})"
        )
    return reasons


def _summary(e: Evidence) -> dict:
    """Set-level means of the evidence, for tables."""
    mean = lambda xs: float(np.mean(xs)) if len(xs) else None  # noqa: E731
    summary = {
        "forget_original": mean(e.forget_original),
        "forget_unlearned": mean(e.forget_unlearned),
        "retain_original": mean(e.retain_original),
        "retain_unlearned": mean(e.retain_unlearned),
        "forget_quantized": e.forget_quantized,
        "probe_layer": e.probe_layer,
        "probe_forget_unlearned": e.probe_forget_unlearned,
        "probe_chance": e.probe_chance,
        "probe_forget_original": e.probe_forget_original,
    }
    for name, look in e.looks.items():
        summary[f"{name}_relearned"] = mean(np.mean(look.candidate_after, axis=0))
        if look.control_after is not None:
            summary[f"{name}_control_relearned"] = mean(np.mean(look.control_after, axis=0))
        if look.chance is not None:
            summary[f"{name}_chance"] = mean(look.chance)
    return summary
