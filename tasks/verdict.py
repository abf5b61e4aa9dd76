"""Verdict stage (CPU): the regime of one unlearning run, from stored scores and curves."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._stage import CPU_OPTIONS, cached_stage, write_json
from tasks.evaluate import SCORES
from tasks.relearn import CURVE
from unlearning_audit import verdict as verdict_mod
from unlearning_audit.config import Thresholds
from unlearning_audit.store import ArtifactRef, Store, code_version

VERDICT = "verdict.json"


def final(store: Store, relearn_ref: ArtifactRef | None, probe: str) -> float | None:
    """Exact match on ``probe`` at the end of a stored recovery curve (None: no such run)."""
    if relearn_ref is None:
        return None
    return store.read_json(relearn_ref, CURVE)["curve"][-1][probe]


@task(name="verdict", cache_policy=NO_CACHE, **CPU_OPTIONS)
def verdict(
    store: str,
    original_eval: ArtifactRef,
    unlearned_eval: ArtifactRef,
    relearned: dict[str, ArtifactRef],
    control: dict[str, ArtifactRef],
    thresholds: Thresholds,
):
    """Decide the regime; ``relearned`` and ``control`` map relearning source to its run."""

    def build(s, out):
        e0, eu = s.read_json(original_eval, SCORES), s.read_json(unlearned_eval, SCORES)
        evidence = verdict_mod.Evidence(
            forget_original=e0["forget"]["exact_match"],
            forget_unlearned=eu["forget"]["exact_match"],
            forget_relearned=final(s, relearned.get("forget"), "forget"),
            retain_original=e0["retain"]["exact_match"],
            retain_unlearned=eu["retain"]["exact_match"],
            heldout_relearned=final(s, relearned.get("forget-half"), "forget_b"),
            control_relearned=final(s, control.get("forget"), "forget"),
            control_heldout=final(s, control.get("forget-half"), "forget_b"),
        )
        decision = verdict_mod.decide(evidence, thresholds)
        write_json(out / VERDICT, decision)
        return {"regime": decision["regime"]}

    return cached_stage(
        store,
        "verdict",
        {
            "original_eval": original_eval,
            "unlearned_eval": unlearned_eval,
            "relearned": relearned,
            "control": control,
        },
        thresholds,
        code_version(verdict_mod),
        build,
    )
