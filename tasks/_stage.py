"""What every stage task shares: running a build through the store's cache, and loading inputs."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.states import Completed

from unlearning_audit import checkpoints, data
from unlearning_audit.store import ArtifactRef, Store


def gpu_options() -> dict:
    """Task options of the GPU stages: tag, retries and backoff (env-configurable)."""
    return {
        "tags": ["gpu"],
        "retries": int(os.environ.get("UNLEARNING_AUDIT_GPU_RETRIES", "2")),
        "retry_delay_seconds": float(os.environ.get("UNLEARNING_AUDIT_GPU_RETRY_DELAY", "5")),
    }


CPU_OPTIONS: dict = {"tags": ["cpu"], "retries": 1, "retry_delay_seconds": 2}


def cached_stage(
    store_url: str,
    stage: str,
    inputs: Mapping[str, Any],
    config: Any,
    version: str,
    build: Callable[[Store, Path], Mapping[str, Any] | None],
):
    """Serve the stage's artifact from the store, or build and store it.

    A stage served from the store ends in a Completed state named "Cached", as Prefect's own
    cache would show it.
    """
    store = Store(store_url)
    ref, cached = store.cached(stage, inputs, config, version, lambda out: build(store, out))
    logger = get_run_logger()
    if cached:
        logger.info("%s: served from the store (%s)", stage, ref.key)
        return Completed(name="Cached", message=f"served from the store: {ref.key}", data=ref)
    logger.info("%s: computed and stored (%s)", stage, ref.key)
    return ref


def load_model(store: Store, ref: ArtifactRef, device, trust_remote_code: bool = False):
    """The model and tokenizer of a checkpoint artifact (already checked when fetched)."""
    return checkpoints.load(store.local_dir(ref), device, trust_remote_code=trust_remote_code)


def load_sets(store: Store, ref: ArtifactRef) -> dict[str, list[dict]]:
    """The probe sets of a data artifact."""
    return data.read_sets(store.local_dir(ref))


def write_json(path: Path, obj: Any) -> None:
    """Write an indented JSON file."""
    path.write_text(json.dumps(obj, indent=1, default=float))
