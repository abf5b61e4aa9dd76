"""Splice stage: the causal layer test of one unlearning run (unlearning_audit/splice.py)."""

from __future__ import annotations

from tasks._stage import cached_stage, load_inputs, load_model, stage_task, write_json
from unlearning_audit import data, evaluation, layers, prompts, runtime, splice, stats
from unlearning_audit.config import Thresholds
from unlearning_audit.store import ArtifactRef, code_version

SPLICE = "splice.json"


@stage_task("splice", "gpu")
def splice_run(
    store: str,
    original: ArtifactRef,
    unlearned: ArtifactRef,
    data_ref: ArtifactRef,
    thresholds: Thresholds,
    depths: list[int] | None = None,
    max_rows: int = 200,
    device: str = "auto",
    trust_remote_code: bool = False,
    gpus: int = 1,
):
    """Forget and retain scores, in the verdict's metric with its intervals, of the original
    with the unlearned model's top k blocks and head, and of the reverse, for k in ``depths``
    (default 1..L) and k = 0 (the models themselves), on the evaluate stage's rows (at most
    ``max_rows`` per set); and the share of the forgetting that restoring the top block undoes
    (splice.restored_share). Both models are held at once (each split over ``gpus`` GPUs)."""

    def build(s, out):
        on = runtime.setup(0, device)
        model, fmt, sets, cap = load_inputs(
            s, original, data_ref, on, trust_remote_code=trust_remote_code, gpus=gpus
        )
        other, _ = load_model(s, unlearned, on, trust_remote_code=trust_remote_code, gpus=gpus)
        metric = evaluation.resolve_metric(thresholds.metric, sets["forget"])
        rows = {name: data.sample(sets[name], max_rows) for name in splice.SETS}
        groups = {name: [r.get("group") or r["id"] for r in rows[name]] for name in rows}
        blocks = splice.n_blocks(model)
        chosen = depths if depths is not None else range(1, blocks + 1)
        facts = splice.splice_facts(
            model,
            other,
            fmt,
            rows,
            chosen,
            metric,
            generate=cap if metric == evaluation.GENERATED else 0,
        )
        alpha, resamples = thresholds.alpha, thresholds.resamples
        result = {
            "metric": metric,
            "blocks": blocks,
            "tied_head": splice.head_tied(model),
            "rows": splice.summarize(facts, groups, alpha, resamples),
            "restored_top1": splice.restored_share(facts, groups["forget"], alpha, resamples),
        }
        write_json(out / SPLICE, result)
        return {"metric": metric, "blocks": blocks, "restored_top1": result["restored_top1"]}

    return cached_stage(
        store,
        "splice",
        {"original": original, "unlearned": unlearned, "data": data_ref},
        {
            "depths": depths,
            "max_rows": max_rows,
            **thresholds.model_dump(include={"metric", "alpha", "resamples"}),
        },
        code_version(splice, evaluation, data, layers, prompts, stats),
        build,
        memory={"gpus": gpus},
    )
