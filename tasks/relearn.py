"""Relearn stage: the relearning attack from one source under one seed; stores its recovery
curve with every fact's scores, and the relearned checkpoint where a later stage needs it."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._progress import stage_progress
from tasks._stage import cached_stage, gpu_options, load_inputs, on_gpus, save_trained, write_json
from unlearning_audit import (
    adapters,
    data,
    distributed,
    evaluation,
    prompts,
    relearning,
    runtime,
    training,
)
from unlearning_audit.config import Precision, RelearnConfig, RelearnSource
from unlearning_audit.store import ArtifactRef, Store, code_version

CURVE = "relearn.json"


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
    keep_checkpoint: bool = True,
    generate: bool = False,
    trust_remote_code: bool = False,
    precision: Precision = "auto",
    gradient_checkpointing: bool = False,
    gpus: int = 1,
):
    """Fine-tune ``checkpoint`` with the relearning budget from ``source`` in the data order of
    ``seed``; the recovery curve scores at most ``max_rows`` rows per set, like the evaluate
    stage. The relearned checkpoint is stored only with ``keep_checkpoint``; with ``generate``,
    facts also carry ROUGE-L of greedy generations (when the verdict reads it). Trains in
    ``precision`` (resolved on this machine's device, and part of the stage's key); the
    relearned checkpoint keeps its dtype (with LoRA, the adapter alone is stored: see
    save_trained). The checkpoint's own model code runs only with ``trust_remote_code`` (the
    audit's parameter; nothing in the store can grant it). With ``gpus`` > 1 it trains on that
    many GPUs (tasks._stage.on_gpus); ``gradient_checkpointing`` and ``gpus`` change memory,
    not results: not part of the key."""
    precision = runtime.resolve_precision(precision, device)

    def build(s, out, cfg: RelearnConfig):  # cfg: config, more micro-batches after an OOM
        run = (source, cfg, seed, device, max_rows, keep_checkpoint, generate, precision)
        run += (gradient_checkpointing,)
        return on_gpus(gpus, device, _build, s, out, checkpoint, data_ref, trust_remote_code, *run)

    return cached_stage(
        store,
        "relearn",
        {"checkpoint": checkpoint, "data": data_ref, "source": source, "seed": seed},
        {
            "relearn": config.model_dump(exclude={"sources", "seeds"}),
            "max_rows": max_rows,
            "keep_checkpoint": keep_checkpoint,
            "generate": generate,
            "precision": precision,
        },
        code_version(relearning, training, adapters, data, evaluation, prompts),
        build,
        batch=config,
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
    gradient_checkpointing: bool,
) -> dict:
    """The stage's build, on one GPU or in every rank of several (rank 0 writes the files)."""
    model, fmt, sets, cap = load_inputs(
        s,
        checkpoint,
        data_ref,
        runtime.setup(seed, device),
        trust_remote_code=trust_remote_code,
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
            gradient_checkpointing,
        )
    adapter = log.pop("adapter")
    keep_whole = keep_checkpoint and adapter is None
    state = distributed.full_state_dict(model) if keep_whole else None
    if distributed.ranks()[0] == 0:
        if keep_checkpoint:
            save_trained(model, fmt.tokenizer, adapter, checkpoint, out, state)
        write_json(out / CURVE, log)
    return {
        "source": source,
        "steps": log["steps"],
        "lr": log["lr"],
        "precision": precision,
        "dtype": str(model.dtype),
    }


def read_curves(store: Store, refs: list[ArtifactRef]) -> list[list[dict]]:
    """The stored recovery curves of one source's runs, one per seed."""
    return [store.read_json(ref, CURVE)["curve"] for ref in refs]
