"""Unlearn stage: one method (in one or more requests) on the original checkpoint; the result
is a new checkpoint."""

from __future__ import annotations

from pathlib import Path

from tasks._progress import stage_progress
from tasks._stage import (
    cached_stage,
    checkpointing_here,
    load_inputs,
    on_gpus,
    save_trained,
    stage_task,
    write_json,
)
from unlearning_audit import (
    adapters,
    data,
    distributed,
    evaluation,
    plan,
    prompts,
    runtime,
    training,
    unlearning,
)
from unlearning_audit.config import Checkpointing, Precision, UnlearnConfig
from unlearning_audit.store import ArtifactRef, Store, code_version


@stage_task("unlearn", "gpu")
def unlearn(
    store: str,
    checkpoint: ArtifactRef,
    data_ref: ArtifactRef,
    config: UnlearnConfig,
    seed: int = 0,
    device: str = "auto",
    trust_remote_code: bool = False,
    precision: Precision = "auto",
    gradient_checkpointing: Checkpointing = "auto",
    gpus: int = 1,
):
    """Run one unlearning method, in ``config.requests`` successive requests (one stage: the
    final model); stores the unlearned checkpoint (with LoRA, the adapter alone: see
    save_trained) and its training log, each request's steps, early stop and checks under
    ``requests`` (unlearning.unlearn).

    Trains in ``precision`` (resolved on this machine's device, and part of the stage's key),
    and stores the checkpoint in the original's dtype. The checkpoint's own model code runs
    only with ``trust_remote_code`` (the audit's parameter; nothing in the store can grant
    it). With ``gpus`` > 1 it trains on that many GPUs (tasks._stage.on_gpus);
    ``gradient_checkpointing`` (auto: decided here, for this machine's device:
    tasks._stage.checkpointing_here; the manifest records it) and ``gpus`` change memory, not
    results: not part of the key."""
    precision = runtime.resolve_precision(precision, device)

    def build(s, out, cfg: UnlearnConfig):  # cfg: config, more micro-batches after an OOM
        args = (s, out, checkpoint, data_ref, cfg, seed, device, trust_remote_code, precision)
        args += (gradient_checkpointing, plan.device_budget(device), gpus, config)
        return on_gpus(gpus, device, _build, *args)

    return cached_stage(
        store,
        "unlearn",
        {"checkpoint": checkpoint, "data": data_ref, "seed": seed},
        {**config.model_dump(), "precision": precision},
        code_version(unlearning, training, adapters, data, evaluation, prompts),
        build,
        batch=config,
        memory={"gradient_checkpointing": gradient_checkpointing, "gpus": gpus},
    )


def _build(
    s: Store,
    out: Path,
    checkpoint: ArtifactRef,
    data_ref: ArtifactRef,
    cfg: UnlearnConfig,
    seed: int,
    device: str,
    trust_remote_code: bool,
    precision: str,
    gradient_checkpointing: Checkpointing,
    budget: int | None,
    gpus: int,
    requested: UnlearnConfig,
) -> dict:
    """The stage's build of ``cfg`` (the ``requested`` config, or it split into more
    micro-batches after an out-of-memory error), on one GPU or in every rank of several (rank 0
    writes the files); each rank decides checkpointing alike, from the same ``budget`` and the
    requested config (a rebuild never turns it off)."""
    model, fmt, sets, _ = load_inputs(
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
        plan.unlearn_estimate,
        requested,
        plan.Compute(precision, gpus=gpus),
    )
    with stage_progress(f"unlearn {cfg.label}") as progress:
        log = unlearning.unlearn(model, fmt, sets, cfg, seed, progress, precision, checkpointing)
    adapter = log.pop("adapter")
    state = distributed.full_state_dict(model) if adapter is None else None
    if distributed.ranks()[0] == 0:
        save_trained(model, fmt.tokenizer, adapter, checkpoint, out, state)
        write_json(out / "unlearn.json", log)
    return {
        "steps": log["steps"],
        "lr": log["lr"],
        "stopped_early": log["stopped_early"],
        "request_steps": [r["steps"] for r in log["requests"]],
        "precision": precision,
        "gradient_checkpointing": checkpointing,
        "dtype": str(model.dtype),
    }
