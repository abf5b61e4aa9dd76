"""Relearn stage: the relearning attack from one source under one seed; stores its recovery
curve with every fact's scores, and where later stages compare the relearned model with the
original, its activations and weight change (measured while it is in memory; its checkpoint only
on request)."""

from __future__ import annotations

import sys
from pathlib import Path

from tasks._progress import stage_progress
from tasks._stage import (
    cached_stage,
    checkpointing_here,
    load_folder,
    load_inputs,
    load_sets,
    on_gpus,
    renderer_for,
    save_trained,
    stage_task,
    write_json,
)
from tasks.extract import PROBE_SETS, write_activations
from unlearning_audit import (
    activations,
    adapters,
    data,
    distributed,
    evaluation,
    layers,
    plan,
    prompts,
    relearning,
    runtime,
    training,
)
from unlearning_audit.config import Checkpointing, Precision, RelearnConfig, RelearnSource
from unlearning_audit.metrics import weights
from unlearning_audit.store import ArtifactRef, Store, code_version

CURVE = "relearn.json"
WEIGHT_CHANGE = "weight_change.json"


@stage_task("relearn", "gpu")
def relearn(
    store: str,
    checkpoint: ArtifactRef,
    data_ref: ArtifactRef,
    source: RelearnSource,
    config: RelearnConfig,
    seed: int = 0,
    device: str = "auto",
    max_rows: int = 200,
    keep_checkpoint: bool = True,
    generate: bool = False,
    trust_remote_code: bool = False,
    precision: Precision = "auto",
    original: ArtifactRef | None = None,
    layer_indices: list[int] | None = None,
    gradient_checkpointing: Checkpointing = "auto",
    gpus: int = 1,
):
    """Fine-tune ``checkpoint`` with the relearning budget from ``source`` in the data order of
    ``seed``; the recovery curve scores at most ``max_rows`` rows per set, like the evaluate
    stage. With ``original`` (the checkpoint ``checkpoint`` was unlearned from), the run also
    stores what the probe and metrics stages read of the relearned model, computed while it is
    in memory: its activations of ``layer_indices`` on the probe rows, as the extract stage
    stores them (write_activations), and its weight change per layer against ``original``
    (WEIGHT_CHANGE). The relearned checkpoint is stored only with ``keep_checkpoint`` (at 7B,
    14 GB that no stage reads; with LoRA, the adapter alone: see save_trained). With
    ``generate``, facts also carry ROUGE-L of greedy generations (when the verdict reads it).
    Trains in ``precision`` (resolved on this machine's device, and part of the stage's key);
    the relearned checkpoint keeps its dtype. The checkpoint's own model code runs only with
    ``trust_remote_code`` (the audit's parameter; nothing in the store can grant it).

    With ``gpus`` > 1 it trains on that many GPUs (tasks._stage.on_gpus); a sharded model
    serves no forward pass after training, so a measuring run then keeps its checkpoint and
    measures it reloaded, split over the GPUs. ``gradient_checkpointing`` (auto: decided here,
    for this machine's device: tasks._stage.checkpointing_here; the manifest records it) and
    ``gpus`` change memory, not results: not part of the key."""
    precision = runtime.resolve_precision(precision, device)
    measure = original is not None
    reload = measure and gpus > 1

    def build(s, out, cfg: RelearnConfig):  # cfg: config, more micro-batches after an OOM
        keep = keep_checkpoint or reload
        run = (source, cfg, seed, device, max_rows, keep, generate, precision)
        run += (gradient_checkpointing, plan.device_budget(device), gpus, config)
        run += (None if reload else original, layer_indices)
        meta = on_gpus(gpus, device, _build, s, out, checkpoint, data_ref, trust_remote_code, *run)
        if reload:  # the relearned model the ranks stored in ``out``, split over the GPUs
            model, tokenizer = load_folder(
                s, out, checkpoint, device, trust_remote_code=trust_remote_code, gpus=gpus
            )
            fmt, sets = renderer_for(s, data_ref, tokenizer), load_sets(s, data_ref)
            _measure(s, model, fmt, sets, out, original, layer_indices, max_rows, trust_remote_code)
        return meta

    inputs = {"checkpoint": checkpoint, "data": data_ref, "source": source, "seed": seed}
    settings = {
        "relearn": config.model_dump(exclude={"sources", "seeds"}),
        "max_rows": max_rows,
        "keep_checkpoint": keep_checkpoint,
        "generate": generate,
        "precision": precision,
    }
    modules = [relearning, training, adapters, data, evaluation, prompts]
    if measure:  # a run that measures: its key names what it measures against
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
        memory={"gradient_checkpointing": gradient_checkpointing, "gpus": gpus},
    )


def _build(
    s: Store,
    out: Path,
    checkpoint: ArtifactRef,
    data_ref: ArtifactRef,
    trust_remote_code: bool,
    source: RelearnSource,
    cfg: RelearnConfig,
    seed: int,
    device: str,
    max_rows: int,
    keep_checkpoint: bool,
    generate: bool,
    precision: str,
    gradient_checkpointing: Checkpointing,
    budget: int | None,
    gpus: int,
    requested: RelearnConfig,
    original: ArtifactRef | None,
    layer_indices: list[int] | None,
) -> dict:
    """The stage's build of ``cfg`` (the ``requested`` config, or it split into more
    micro-batches after an out-of-memory error), on one GPU or in every rank of several (rank 0
    writes the files); each rank decides checkpointing alike, from the same ``budget`` and the
    requested config (a rebuild never turns it off)."""
    model, fmt, sets, cap = load_inputs(
        s,
        checkpoint,
        data_ref,
        runtime.setup(seed, device),
        trust_remote_code=trust_remote_code,
    )
    checkpointing = checkpointing_here(
        gradient_checkpointing,
        budget,
        (model, fmt, sets),
        plan.relearn_estimate,
        requested,
        plan.Compute(precision, gpus=gpus),
    )
    with stage_progress(f"relearn from {source}") as progress:
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
            checkpointing,
        )
    adapter = log.pop("adapter")
    keep_whole = keep_checkpoint and adapter is None
    state = distributed.full_state_dict(model) if keep_whole else None
    if distributed.ranks()[0] == 0:
        if keep_checkpoint:
            save_trained(model, fmt.tokenizer, adapter, checkpoint, out, state)
        if original is not None:  # one process: the relearned model is still whole here
            _measure(s, model, fmt, sets, out, original, layer_indices, max_rows, trust_remote_code)
        write_json(out / CURVE, log)
    return {
        "source": source,
        "steps": log["steps"],
        "lr": log["lr"],
        "precision": precision,
        "gradient_checkpointing": checkpointing,
        "dtype": str(model.dtype),
    }


def _measure(
    s: Store,
    model,
    fmt: prompts.Renderer,
    sets: dict[str, list[dict]],
    out: Path,
    original: ArtifactRef,
    layer_indices: list[int] | None,
    max_rows: int,
    trust_remote_code: bool,
) -> None:
    """Store the relearned ``model``'s activations (as the extract stage does) and its weight
    change per layer against ``original``, read tensor by tensor from its files."""
    write_activations(model, fmt, sets, out, layer_indices, max_rows)
    change = weights.weight_change_from_checkpoint(
        s.local_dir(original), model, trust_remote_code=trust_remote_code
    )
    write_json(out / WEIGHT_CHANGE, change)


def read_curves(store: Store, refs: list[ArtifactRef]) -> list[list[dict]]:
    """The stored recovery curves of one source's runs, one per seed."""
    return [store.read_json(ref, CURVE)["curve"] for ref in refs]


def read_weight_change(store: Store, ref: ArtifactRef) -> dict[int, float]:
    """The weight change per layer a measuring relearn run stored (see relearn's ``original``)."""
    return {int(layer): value for layer, value in store.read_json(ref, WEIGHT_CHANGE).items()}
