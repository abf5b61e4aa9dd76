"""Verdict stage (CPU): the regime of one unlearning run, from stored scores and curves."""

from __future__ import annotations

import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._stage import CPU_OPTIONS, cached_stage, write_json
from tasks.evaluate import SCORES
from tasks.probe import PROBES
from tasks.relearn import CURVE
from unlearning_audit import verdict as verdict_mod
from unlearning_audit.config import Thresholds
from unlearning_audit.store import ArtifactRef, Store, code_version

VERDICT = "verdict.json"


def read_probes(store: Store, probes: dict[str, ArtifactRef]) -> dict[str, list[dict]]:
    """The stored probe tables, by model name."""
    return {
        name: pq.read_table(store.open(ref, PROBES)).to_pylist() for name, ref in probes.items()
    }


def best_probe(tables: dict[str, list[dict]]) -> dict[str, float | int]:
    """The layer where a probe decodes forget answers from the unlearned model furthest above
    its measured chance, with the original model's probe accuracy at that layer."""
    value = {
        (model, r["layer"], r["metric"]): r["value"] for model, rows in tables.items() for r in rows
    }
    gap = {
        r["layer"]: r["value"] - value[("unlearned", r["layer"], "probe_chance")]
        for r in tables["unlearned"]
        if r["metric"] == "probe_forget"
    }
    gap = {layer: g for layer, g in gap.items() if g == g}  # drop NaN layers
    if not gap:
        return {}
    layer = max(gap, key=gap.get)
    return {
        "probe_layer": layer,
        "probe_forget_unlearned": value[("unlearned", layer, "probe_forget")],
        "probe_chance": value[("unlearned", layer, "probe_chance")],
        "probe_forget_original": value[("original", layer, "probe_forget")],
    }


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
    quantized: dict[str, ArtifactRef] | None = None,
    probes: dict[str, ArtifactRef] | None = None,
):
    """Decide the regime; ``relearned`` and ``control`` map relearning source to its run;
    ``quantized`` (bits -> evaluation) and ``probes`` add the other recovery attacks' evidence."""

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
            forget_quantized={
                bits: s.read_json(ref, SCORES)["forget"]["exact_match"]
                for bits, ref in (quantized or {}).items()
            },
            **(best_probe(read_probes(s, probes)) if probes else {}),
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
            "quantized": quantized,
            "probes": probes,
        },
        thresholds,
        code_version(verdict_mod),
        build,
    )
