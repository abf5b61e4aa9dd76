"""Extract stage: layer activations of one checkpoint on the probe sets, to Parquet."""

from __future__ import annotations

from pathlib import Path

from tasks._progress import stage_progress
from tasks._stage import cached_stage, load_inputs, stage_task, write_json
from unlearning_audit import activations, data, layers, prompts, runtime
from unlearning_audit.store import ArtifactRef, code_version

PROBE_SETS = ("forget", "retain")
SUMMARY = "activations.json"


def probe_rows(sets: dict[str, list[dict]], max_rows: int) -> dict[str, list[dict]]:
    """The rows activations are extracted on, in order: a seeded sample of each probe set. The
    probe stage pairs its labels with activation rows through this one function."""
    return {name: data.sample(sets[name], max_rows) for name in PROBE_SETS}


def write_activations(
    model,
    fmt: prompts.Renderer,
    sets: dict[str, list[dict]],
    out: Path,
    layer_indices: list[int] | None,
    max_rows: int,
) -> dict:
    """Write ``model``'s activations on the probe rows (probe_rows) into the artifact folder
    ``out``, with their summary (SUMMARY), which it returns. What every artifact the probe and
    metrics stages read activations from holds: this stage's, and the relearn run that measures
    the relearned model in memory instead of storing it."""
    with stage_progress("extract activations") as progress:
        summary = activations.extract(
            model, fmt, probe_rows(sets, max_rows), out, layer_indices, progress=progress
        )
    write_json(out / SUMMARY, summary)
    return summary


@stage_task("extract", "gpu")
def extract(
    store: str,
    checkpoint: ArtifactRef,
    data_ref: ArtifactRef,
    layer_indices: list[int] | None = None,
    max_rows: int = 200,
    device: str = "auto",
    trust_remote_code: bool = False,
    gpus: int = 1,
):
    """Masked-mean pooled activations of every selected layer, per probe set.

    The checkpoint's own model code runs only with ``trust_remote_code`` (the audit's
    parameter; nothing in the store can grant it). With ``gpus`` > 1 the model is split over
    that many GPUs (checkpoints.load); the meta records them, the key does not."""

    def build(s, out):
        model, fmt, sets, _ = load_inputs(
            s,
            checkpoint,
            data_ref,
            runtime.setup(0, device),
            trust_remote_code=trust_remote_code,
            gpus=gpus,
        )
        summary = write_activations(model, fmt, sets, out, layer_indices, max_rows)
        return {**summary, "model_dtype": str(model.dtype), "gpus": gpus}

    return cached_stage(
        store,
        "activations",
        {"checkpoint": checkpoint, "data": data_ref},
        {"layers": layer_indices, "max_rows": max_rows, "sets": PROBE_SETS},
        code_version(activations, data, layers, prompts),
        build,
        memory={"gpus": gpus},
    )
