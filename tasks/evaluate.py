"""Evaluate stage: token-level scores of one checkpoint on every probe set."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._stage import cached_stage, gpu_options, load_model, load_sets, write_json
from unlearning_audit import data, evaluation, quantization, runtime
from unlearning_audit.store import ArtifactRef, code_version

SCORES = "evaluation.json"


@task(name="evaluate", cache_policy=NO_CACHE, **gpu_options())
def evaluate(
    store: str,
    checkpoint: ArtifactRef,
    data_ref: ArtifactRef,
    max_rows: int = 200,
    device: str = "auto",
    bits: int | None = None,
):
    """Exact match, token accuracy and NLL on each set (at most ``max_rows`` rows each);
    with ``bits``, of the checkpoint after round-to-nearest weight quantization."""

    def build(s, out):
        model, tokenizer = load_model(s, checkpoint, runtime.setup(0, device))
        if bits is not None:
            quantization.quantize_model(model, bits)
        scores = {
            name: evaluation.evaluate(model, tokenizer, data.sample(rows, max_rows))
            for name, rows in load_sets(s, data_ref).items()
        }
        write_json(out / SCORES, scores)
        return {name: round(v["exact_match"], 4) for name, v in scores.items() if v["n"]}

    return cached_stage(
        store,
        "evaluate",
        {"checkpoint": checkpoint, "data": data_ref},
        {"max_rows": max_rows, "bits": bits},
        code_version(evaluation, data, quantization),
        build,
    )
