"""Relearn stage: the relearning attack from one source under one seed; stores its recovery
curve with every fact's scores, and where later stages compare the relearned model with the
original, its activations and weight change (measured while it is in memory; its checkpoint only
on request)."""

from __future__ import annotations

import sys

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._progress import StageProgress
from tasks._stage import cached_stage, gpu_options, load_inputs, write_json
from tasks.extract import PROBE_SETS, write_activations
from unlearning_audit import (
    activations,
    checkpoints,
    data,
    evaluation,
    layers,
    prompts,
    relearning,
    runtime,
    training,
)
from unlearning_audit.config import Precision, RelearnConfig, RelearnSource
from unlearning_audit.metrics import weights
from unlearning_audit.store import ArtifactRef, Store, code_version

CURVE = "relearn.json"
WEIGHT_CHANGE = "weight_change.json"


@task(name="relearn", cache_policy=NO_CACHE, **gpu_options())
def relearn(
    store: str,
    checkpoint: ArtifactRef,
    data_ref: ArtifactRef,
    source: RelearnSource,
    config: RelearnConfig,
    seed: int = 0,
    device: str = "auto",
    max_rows: int = 200,
    keep_checkpoint: bool = False,
    generate: bool = False,
    trust_remote_code: bool = False,
    precision: Precision = "auto",
    original: ArtifactRef | None = None,
    layer_indices: list[int] | None = None,
):
    """Fine-tune ``checkpoint`` with the relearning budget from ``source`` in the data order of
    ``seed``; the recovery curve scores at most ``max_rows`` rows per set, like the evaluate
    stage. With ``original`` (the checkpoint ``checkpoint`` was unlearned from), the run also
    stores what the probe and metrics stages read of the relearned model, computed while it is
    in memory: its activations of ``layer_indices`` on the probe rows, as the extract stage
    stores them (write_activations), and its weight change per layer against ``original``
    (WEIGHT_CHANGE). The relearned checkpoint is stored only with ``keep_checkpoint`` (at 7B,
    14 GB that no stage reads). With ``generate``, facts also carry ROUGE-L of greedy
    generations (when the verdict reads it). Trains in ``precision`` (resolved on this
    machine's device, and part of the stage's key); the relearned checkpoint keeps its dtype.
    The checkpoint's own model code runs only with ``trust_remote_code`` (the audit's
    parameter; nothing in the store can grant it)."""
    precision = runtime.resolve_precision(precision, device)

    def build(s, out, cfg: RelearnConfig):  # cfg: config, more micro-batches after an OOM
        model, fmt, sets, cap = load_inputs(
            s,
            checkpoint,
            data_ref,
            runtime.setup(seed, device),
            trust_remote_code=trust_remote_code,
        )
        with StageProgress(f"relearn from {source}") as progress:
            log = relearning.relearn(
                model,
                fmt,
                sets,
                source,
                cfg,
                seed,
                progress,
                max_rows,
                cap if generate else 0,
                precision,
            )
        if keep_checkpoint:
            checkpoints.save(model, fmt.tokenizer, out)
        if original is not None:
            write_activations(model, fmt, sets, out, layer_indices, max_rows)
            change = weights.weight_change_from_checkpoint(
                s.local_dir(original), model, trust_remote_code=trust_remote_code
            )
            write_json(out / WEIGHT_CHANGE, change)
        write_json(out / CURVE, log)
        return {
            "source": source,
            "steps": log["steps"],
            "lr": log["lr"],
            "precision": precision,
            "dtype": str(model.dtype),
        }

    inputs = {"checkpoint": checkpoint, "data": data_ref, "source": source, "seed": seed}
    settings = {
        "relearn": config.model_dump(exclude={"sources", "seeds"}),
        "max_rows": max_rows,
        "keep_checkpoint": keep_checkpoint,
        "generate": generate,
        "precision": precision,
    }
    modules = [relearning, training, data, evaluation, prompts]
    if original is not None:  # a run that measures: its key names what it measures against
        inputs["original"] = original
        settings["activations"] = {"layers": layer_indices, "sets": PROBE_SETS}
        modules += [activations, layers, weights, sys.modules[write_activations.__module__]]
    return cached_stage(
        store,
        "relearn",
        inputs,
        settings,
        code_version(*modules),
        build,
        batch=config,
    )


def read_curves(store: Store, refs: list[ArtifactRef]) -> list[list[dict]]:
    """The stored recovery curves of one source's runs, one per seed."""
    return [store.read_json(ref, CURVE)["curve"] for ref in refs]


def read_weight_change(store: Store, ref: ArtifactRef) -> dict[int, float]:
    """The weight change per layer a measuring relearn run stored (see relearn's ``original``)."""
    return {int(layer): value for layer, value in store.read_json(ref, WEIGHT_CHANGE).items()}
