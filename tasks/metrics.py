"""Metrics stage (CPU): representation metrics of a candidate against the original, from stored
activations and weights, as one long-format Parquet table."""

from __future__ import annotations

from tasks._stage import cached_stage, load_model, stage_task
from tasks.extract import PROBE_SETS, SUMMARY
from tasks.fisher import read_fisher, read_fisher_summary
from tasks.relearn import read_weight_change
from unlearning_audit import activations, runtime
from unlearning_audit.metrics import cka, depth, fisher, pca, table, weights
from unlearning_audit.store import ArtifactRef, code_version

TABLE = "metrics.parquet"


@stage_task("metrics", "cpu")
def metrics(
    store: str,
    original: ArtifactRef,
    candidate: ArtifactRef,
    original_acts: ArtifactRef,
    candidate_acts: ArtifactRef,
    original_fisher: ArtifactRef | None = None,
    candidate_fisher: ArtifactRef | None = None,
    k: int = 2,
    trust_remote_code: bool = False,
    stored_change: bool = False,
):
    """CKA, PCA similarity, shift and distance per layer and probe set; weight change per layer;
    Fisher summaries (empirical, and the model's where the Fisher stage computed it) and the
    Fisher-weighted distance when both Fishers are given; the depth shares of the weight change
    and of the Fisher-weighted distance (metrics.depth, table.depth_rows). The weight
    change is computed from the two checkpoints, or with ``stored_change`` read from
    ``candidate``: a relearn run that measured it against ``original`` while its model was in
    memory (tasks/relearn.py), and stored no checkpoint to load. The checkpoints' own model code
    runs only with ``trust_remote_code`` (the audit's parameter; nothing in the store can grant
    it)."""
    if stored_change and candidate_fisher is not None:
        raise ValueError("the Fisher metrics need the candidate's weights, not a stored change")

    def build(s, out):
        runtime.setup(0, "cpu")
        layers = s.read_json(original_acts, SUMMARY)["layers"]
        rows = table.activation_rows(
            s.local_dir(original_acts), s.local_dir(candidate_acts), list(PROBE_SETS), layers, k
        )
        if stored_change:
            rows += table.weight_rows(read_weight_change(s, candidate))
        else:
            model0, model = (
                load_model(s, ref, "cpu", trust_remote_code=trust_remote_code)[0]
                for ref in (original, candidate)
            )
            weights.check_same_architecture(model0, model)
            # one pass over the weights for each measure: per parameter, summed by layer and
            # by depth part
            changes = list(weights.squared_changes(dict(model0.named_parameters()), model))
            rows += table.weight_rows(weights.relative_change(changes, model))
            fisher_parts = None
            if original_fisher is not None and candidate_fisher is not None:
                f0 = read_fisher(s, original_fisher)
                terms = list(fisher.fisher_weighted_terms(f0, model, model0))
                rows += table.fisher_rows(
                    f0,
                    read_fisher_summary(s, candidate_fisher),
                    weights.sum_by_layer(terms, model0),
                )
                rows += table.fisher_summary_rows(
                    "fisher_model",
                    _means(read_fisher_summary(s, original_fisher, "model")),
                    read_fisher_summary(s, candidate_fisher, "model"),
                )
                fisher_parts = depth.fisher_depth(terms, f0, model0)
            rows += table.depth_rows(depth.weight_depth(changes, model), fisher_parts)
        table.write(rows, out / TABLE)
        return {"rows": len(rows)}

    return cached_stage(
        store,
        "metrics",
        {
            "original": original,
            "candidate": candidate,
            "original_acts": original_acts,
            "candidate_acts": candidate_acts,
            "original_fisher": original_fisher,
            "candidate_fisher": candidate_fisher,
        },
        {"k": k, "stored_change": stored_change},
        code_version(table, cka, pca, weights, fisher, depth, activations),
        build,
    )


def _means(summary: dict[int, dict]) -> dict[int, float]:
    """Each layer's mean from a Fisher's per-layer summary."""
    return {layer: entry["mean"] for layer, entry in summary.items()}
