"""The watch flow: start one `audit` deployment run for every checkpoint of a source, once.

A source is a local folder of checkpoint folders, an fsspec URL (``s3://bucket/prefix``) of
checkpoint prefixes, or a Hugging Face repo id (``org/name``) whose branches and tags are the
checkpoints. A checkpoint is a folder (or prefix) holding a config.json.

Each audit run carries an idempotency key derived from the checkpoint's identity (file sizes and
modification times, object ETags, or the hub commit) and the audit parameters, so a second watch
run, or two at once, never starts the same audit twice; a rewritten checkpoint is new.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prefect import flow, get_client, get_run_logger
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterIdempotencyKey,
)
from prefect.deployments import run_deployment

from unlearning_audit.config import AuditParams
from unlearning_audit.store import digest, filesystem

DEFAULT_PARAMS = AuditParams()
CONFIG = "config.json"
HUB_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint found in a source: its spec for the audit, and what it is known by."""

    spec: str
    identity: dict


def list_checkpoints(source: str) -> list[Checkpoint]:
    """The checkpoints of a local folder, an fsspec URL prefix or a hub repo (``org/name``)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _local(path.resolve())
    if "://" in source:
        return _remote(source.rstrip("/"))
    if HUB_REPO.match(source):
        return _hub(source)
    raise ValueError(f"watch source {source!r}: no such folder, URL or hub repo id")


def _local(folder: Path) -> list[Checkpoint]:
    return [
        Checkpoint(
            str(sub),
            {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(sub.iterdir())},
        )
        for sub in sorted(folder.iterdir())
        if (sub / CONFIG).is_file()
    ]


def _remote(url: str) -> list[Checkpoint]:
    fs, root = filesystem(url)
    protocol = url.split("://", 1)[0]
    found = []
    for entry in fs.ls(root, detail=True):
        if entry["type"] != "directory":
            continue
        files = {f["name"].rsplit("/", 1)[-1]: f for f in fs.ls(entry["name"], detail=True)}
        if CONFIG in files:
            identity = {name: str(f.get("ETag") or f.get("size")) for name, f in files.items()}
            found.append(Checkpoint(f"{protocol}://{entry['name'].lstrip('/')}", identity))
    return sorted(found, key=lambda c: c.spec)


def _hub(repo: str) -> list[Checkpoint]:
    from huggingface_hub import HfApi

    refs = HfApi().list_repo_refs(repo)
    commits = sorted({ref.target_commit for ref in [*refs.branches, *refs.tags]})
    return [Checkpoint(f"{repo}@{commit}", {"repo": repo, "commit": commit}) for commit in commits]


def audit_key(checkpoint: Checkpoint, role: str, params: AuditParams) -> str:
    """The idempotency key of the audit of ``checkpoint`` in ``role`` with ``params``."""
    what = {"checkpoint": checkpoint.identity, "role": role, "params": params}
    return f"watch-{digest(what)[:32]}"


def _audited(client, deployment_id, keys: list[str]) -> set[str]:
    """Which of ``keys`` already name a run of the deployment."""
    if not keys:
        return set()
    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=keys)),
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
    )
    return {run.idempotency_key for run in runs}


@flow(name="watch")
def watch(
    source: str,
    params: AuditParams = DEFAULT_PARAMS,
    role: Literal["original", "unlearned"] = "original",
    deployment: str = "audit-checkpoint/audit",
) -> list[dict]:
    """Start an audit for each checkpoint of ``source`` not audited yet; returns those started.

    ``params`` is the audit's template; each checkpoint becomes its ``original`` (or, with
    role "unlearned", its ``unlearned`` checkpoint, audited against ``params.original``).
    """
    logger = get_run_logger()
    found = {audit_key(c, role, params): c for c in list_checkpoints(source)}
    with get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name(deployment).id
        audited = _audited(client, deployment_id, list(found))
    started = []
    for key, checkpoint in found.items():
        if key in audited:  # the key alone would make it the same run; this saves the call
            continue
        spec = checkpoint.spec
        run = run_deployment(
            deployment_id,
            parameters={"params": params.model_copy(update={role: spec}).model_dump(mode="json")},
            idempotency_key=key,
            timeout=0,
            as_subflow=False,
        )
        logger.info("%s: audit %s started", spec, run.name)
        started.append({"checkpoint": spec, "flow_run": str(run.id), "key": key})
    logger.info(
        "%s: %d checkpoints, %d audited before, %d audits started",
        source,
        len(found),
        len(audited),
        len(started),
    )
    return started
