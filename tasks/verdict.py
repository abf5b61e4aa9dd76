"""Verdict stage (CPU): the regime of one unlearning run, from stored scores and curves."""

from __future__ import annotations

import pyarrow.parquet as pq

from tasks._stage import cached_stage, load_sets, stage_task, write_json
from tasks.evaluate import SCORES
from tasks.probe import PROBES, skipped
from tasks.relearn import read_curves
from unlearning_audit import data, evaluation, stats
from unlearning_audit import verdict as verdict_mod
from unlearning_audit.config import Thresholds
from unlearning_audit.store import ArtifactRef, Store, code_version

VERDICT = "verdict.json"
LOOK_SOURCES = (
    ("forget", "forget", "forget", "forget"),
    ("heldout", "forget-half", "forget_b", "forget_a"),
    ("retain", "retain", "forget", None),
    ("unrelated", "unrelated", "forget", None),
)
"""(look, relearning source, the facts it is scored on, the rows it trains on): the first two
decide the regime; relearning on retain or unrelated data trains on no forget fact, and its gain
on the forget set over the control's is reported beside the regime (``side_looks``), to tell
which data brings knowledge back."""


def _read_tables(
    store: Store, probes: dict[str, ArtifactRef]
) -> tuple[dict[str, list[dict]], str | None]:
    """The stored probe tables by model name, read once, and why the probes were skipped
    (labels without signal, tasks.probe.skipped): then no tables, no probe evidence."""
    tables = {name: pq.read_table(store.open(ref, PROBES)) for name, ref in probes.items()}
    reason = next(filter(None, map(skipped, tables.values())), None)
    if reason:
        return {}, reason
    return {name: table.to_pylist() for name, table in tables.items()}, None


def read_probes(store: Store, probes: dict[str, ArtifactRef]) -> dict[str, list[dict]]:
    """The stored probe tables, by model name; none when the probes were skipped."""
    return _read_tables(store, probes)[0]


def probe_evidence(store: Store, probes: dict[str, ArtifactRef]) -> dict:
    """The probe fields of a verdict's evidence: the best layer's accuracies, or why the probe
    stage was skipped."""
    tables, reason = _read_tables(store, probes)
    return {"probe_skipped": reason} if reason else best_probe(tables)


def best_probe(tables: dict[str, list[dict]]) -> dict[str, float | int]:
    """The layer where a probe decodes forget answers from the unlearned model furthest above
    its measured chance, with the original model's probe accuracy at that layer; empty
    without probe tables (no probe evidence)."""
    if not tables:
        return {}
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


def _facts(scores: dict, metric: str) -> tuple[list[str], list[str], list[float]]:
    """A set's fact ids, groups and scores in ``metric`` from a stored evaluation."""
    rows = scores["rows"]
    return rows["id"], rows["group"], rows[metric]


def _at(curves: list[list[dict]], where: int, probe: str, metric: str, ids: list[str]):
    """Per seed, each fact's score on ``probe`` at curve point ``where`` (0 before relearning,
    -1 after), checked to list the same facts as ``ids``."""
    out = []
    for curve in curves:
        facts = curve[where]["facts"][probe]
        if facts["id"] != ids:
            raise ValueError(f"relearning curve of {probe!r} scores other facts than the verdict")
        out.append(facts[metric])
    return out


def evidence(
    s: Store,
    data_ref: ArtifactRef,
    original_eval: ArtifactRef,
    unlearned_eval: ArtifactRef,
    relearned: dict[str, list[ArtifactRef]],
    control: dict[str, list[ArtifactRef]],
    metric: str,
) -> dict:
    """The per-fact evidence of one run, paired by fact id, as ``verdict.Evidence`` fields, in
    ``metric`` (``auto``: the forget set's default, evaluation.default_metric)."""
    sets = load_sets(s, data_ref)
    metric = evaluation.resolve_metric(metric, sets["forget"])
    e0, eu = s.read_json(original_eval, SCORES), s.read_json(unlearned_eval, SCORES)
    ids, groups, forget0 = _facts(e0["forget"], metric)
    retain_ids, retain_groups, retain0 = _facts(e0["retain"], metric)
    if eu["forget"]["rows"]["id"] != ids or eu["retain"]["rows"]["id"] != retain_ids:
        raise ValueError("the original's and the unlearned model's evaluations list other facts")
    looks, side_looks, capacity = {}, {}, None
    for name, source, probe, trained in LOOK_SOURCES:
        if source not in relearned:
            continue
        runs = read_curves(s, relearned[source])
        probe_ids = runs[0][0]["facts"][probe]["id"]
        rows = _rows(sets[probe], probe_ids)
        look = {
            "groups": _groups(rows),
            "candidate_before": _at(runs, 0, probe, metric, probe_ids)[0],
            "candidate_after": _at(runs, -1, probe, metric, probe_ids),
            "chance": data.chance(rows, sets["retain"]) if metric == "exact_match" else None,
        }
        controls = read_curves(s, control[source]) if source in control else None
        if controls is not None:
            look["control_before"] = _at(controls, 0, probe, metric, probe_ids)[0]
            look["control_after"] = _at(controls, -1, probe, metric, probe_ids)
        if trained is None:  # another source's gain on the forget set: beside the regime
            side_looks[name] = look
            continue
        # what the attack does to the rows it trains on: half A where there is one
        trained_ids = runs[0][0]["facts"][trained]["id"]
        capacity = {
            "groups": _groups(_rows(sets[trained], trained_ids)),
            "candidate": _at(runs, -1, trained, metric, trained_ids),
            "control": None
            if controls is None
            else _at(controls, -1, trained, metric, trained_ids),
        }
        looks[name] = look
    return {
        "metric": metric,
        "prompt_format": e0.get("format"),
        "forget_groups": groups,
        "forget_original": forget0,
        "forget_unlearned": eu["forget"]["rows"][metric],
        "retain_groups": retain_groups,
        "retain_original": retain0,
        "retain_unlearned": eu["retain"]["rows"][metric],
        "looks": looks,
        "side_looks": side_looks,
        "capacity": capacity,
    }


def _forget_scores(s: Store, evaluation_ref: ArtifactRef, metric: str, ids: list[str]):
    """One stored evaluation's per-fact forget scores in ``metric``, checked to list ``ids``."""
    rows = s.read_json(evaluation_ref, SCORES)["forget"]["rows"]
    if rows["id"] != ids:
        raise ValueError("a quantized evaluation scores other forget facts than the verdict")
    return rows[metric]


def quantized_evidence(
    s: Store,
    quantized: dict[str, ArtifactRef],
    references: dict[str, dict[str, ArtifactRef]],
    control_eval: ArtifactRef | None,
    metric: str,
    ids: list[str],
) -> dict[str, dict]:
    """Per bit width, the ``verdict.Quantized`` fields: the unlearned model's quantized forget
    scores, the references' (``references``: model, original or control, -> bit width ->
    evaluation) where measured, and the control's unquantized ones (``control_eval``)."""
    out = {}
    for bits, ref in quantized.items():
        found = {"unlearned": _forget_scores(s, ref, metric, ids)}
        for model, by_bits in references.items():
            if bits in by_bits:
                found[model] = _forget_scores(s, by_bits[bits], metric, ids)
        if "control" in found and control_eval is not None:
            found["control_unquantized"] = _forget_scores(s, control_eval, metric, ids)
        out[bits] = found
    return out


def _groups(rows: list[dict]) -> list[str]:
    """Each fact's group, its own id where it has none (then it is its own cluster)."""
    return [r.get("group") or r["id"] for r in rows]


def _rows(rows: list[dict], ids: list[str]) -> list[dict]:
    """The rows of these fact ids, in their order."""
    by_id = {r["id"]: r for r in rows}
    return [by_id[i] for i in ids]


@stage_task("check-known", "cpu")
def check_known(
    store: str, data_ref: ArtifactRef, original_eval: ArtifactRef, thresholds: Thresholds
) -> str:
    """Refuse the audit, before any training, when the original does not know the forget set
    in the verdict's metric; returns the metric it was judged in."""
    s = Store(store)
    metric = evaluation.resolve_metric(thresholds.metric, load_sets(s, data_ref)["forget"])
    scores = s.read_json(original_eval, SCORES)
    problem = verdict_mod.known_problem(scores, metric, thresholds.known)
    if problem:
        raise ValueError(problem)
    return metric


@stage_task("verdict", "cpu")
def verdict(
    store: str,
    data_ref: ArtifactRef,
    original_eval: ArtifactRef,
    unlearned_eval: ArtifactRef,
    relearned: dict[str, list[ArtifactRef]],
    control: dict[str, list[ArtifactRef]],
    thresholds: Thresholds,
    quantized: dict[str, ArtifactRef] | None = None,
    probes: dict[str, ArtifactRef] | None = None,
    quantized_references: dict[str, dict[str, ArtifactRef]] | None = None,
    control_eval: ArtifactRef | None = None,
):
    """Decide the regime from per-fact scores; ``relearned`` and ``control`` map relearning
    source to its runs, one per seed; ``quantized`` (bits -> evaluation) and ``probes`` add the
    other recovery attacks' evidence. ``quantized_references`` (original or control -> bits ->
    evaluation) and the control's unquantized ``control_eval`` are what quantization does to
    the references (verdict module doc): without them no recovery under quantization is
    claimed."""

    def build(s, out):
        found = evidence(
            s,
            data_ref,
            original_eval,
            unlearned_eval,
            relearned,
            control,
            thresholds.metric,
        )
        ids = s.read_json(original_eval, SCORES)["forget"]["rows"]["id"]
        decision = verdict_mod.decide(
            verdict_mod.Evidence(
                **found,
                quantized=quantized_evidence(
                    s,
                    quantized or {},
                    quantized_references or {},
                    control_eval,
                    found["metric"],
                    ids,
                ),
                **(probe_evidence(s, probes) if probes else {}),
            ),
            thresholds,
        )
        write_json(out / VERDICT, decision)
        return {"regime": decision["regime"]}

    return cached_stage(
        store,
        "verdict",
        {
            "data": data_ref,
            "original_eval": original_eval,
            "unlearned_eval": unlearned_eval,
            "relearned": relearned,
            "control": control,
            "quantized": quantized,
            "probes": probes,
            "quantized_references": quantized_references,
            "control_eval": control_eval,
        },
        thresholds,
        code_version(verdict_mod, stats, data, evaluation),
        build,
    )
