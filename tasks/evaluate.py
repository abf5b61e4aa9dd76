"""Evaluate stage: token-level scores of one checkpoint on every probe set."""

from __future__ import annotations

from tasks._stage import cached_stage, load_inputs, stage_task, write_json
from unlearning_audit import data, evaluation, prompts, quantization, runtime
from unlearning_audit.store import ArtifactRef, code_version

SCORES = "evaluation.json"
GENERATED = ("forget", "retain")
"""The sets scored by greedy generation too (ROUGE-L): the verdict's and the report's."""


@stage_task("evaluate", "gpu")
def evaluate(
    store: str,
    checkpoint: ArtifactRef,
    data_ref: ArtifactRef,
    max_rows: int = 200,
    device: str = "auto",
    bits: int | None = None,
    embeddings: bool = False,
    trust_remote_code: bool = False,
    gpus: int = 1,
):
    """Every score (evaluation.py) on each set (at most ``max_rows`` rows each), ROUGE-L of
    greedy generations on the forget and retain sets; with ``bits``, of the checkpoint after
    round-to-nearest quantization of every weight matrix, the input embeddings and LM head too
    with ``embeddings``. The checkpoint's own model code runs only with ``trust_remote_code``
    (the audit's parameter; nothing in the store can grant it). With ``gpus`` > 1 the model is
    split over that many GPUs (checkpoints.load); the meta records them, the key does not."""

    def build(s, out):
        model, fmt, sets, cap = load_inputs(
            s,
            checkpoint,
            data_ref,
            runtime.setup(0, device),
            trust_remote_code=trust_remote_code,
            gpus=gpus,
        )
        quantized = {}
        if bits is not None:
            quantized["quantized_matrices"] = quantization.quantize_model(model, bits, embeddings)
        scores = {  # generations where the verdict and the report read them
            name: evaluation.evaluate(
                model, fmt, data.sample(rows, max_rows), generate=cap if name in GENERATED else 0
            )
            for name, rows in sets.items()
        }
        dtype = str(model.dtype)  # the checkpoint's own (checkpoints.load)
        write_json(out / SCORES, {**scores, "format": fmt.name, "dtype": dtype})
        return {
            "format": fmt.name,
            "dtype": dtype,
            "gpus": gpus,
            **quantized,
            **{name: round(v["exact_match"], 4) for name, v in scores.items() if v["n"]},
        }

    return cached_stage(
        store,
        "evaluate",
        {"checkpoint": checkpoint, "data": data_ref},
        {"max_rows": max_rows, "bits": bits, "embeddings": embeddings},
        code_version(evaluation, data, quantization, prompts),
        build,
        memory={"gpus": gpus},
    )
