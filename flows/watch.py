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
from prefect.artifacts import create_table_artifact
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterIdempotencyKey,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_UI_URL
from prefect.states import AwaitingRetry

from unlearning_audit.config import AuditParams
from unlearning_audit.preflight import preflight
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


def _runs_by_key(client, deployment_id, keys: list[str]) -> dict[str, object]:
    """The deployment's runs named by ``keys``, by key."""
    if not keys:
        return {}
    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=keys)),
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
    )
    return {run.idempotency_key: run for run in runs}


def _problem(params: AuditParams) -> str | None:
    """Why the audit ``params`` describes would fail before any stage (preflight), or None."""
    try:
        preflight(params)
    except ValueError as exc:
        return str(exc)
    return None


def _ui_link(flow_run_id) -> str:
    """The flow run's page in the Prefect UI (its id where no UI URL is known)."""
    ui = PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else str(flow_run_id)


@flow(name="watch")
def watch(
    source: str,
    params: AuditParams = DEFAULT_PARAMS,
    role: Literal["original", "unlearned"] = "original",
    deployment: str = "audit-checkpoint/audit",
    max_retries: int = 2,
) -> list[dict]:
    """Start an audit for each checkpoint of ``source`` not audited yet, and retry each whose
    audit failed or crashed, at most ``max_retries`` times; returns what it started and retried.

    ``params`` is the audit's template; each checkpoint becomes its ``original`` (or, with
    role "unlearned", its ``unlearned`` checkpoint, audited against ``params.original``).
    Every new audit is checked first (preflight): one that would fail at once is not started,
    and the watch run fails after starting the valid ones, naming each problem. A table
    artifact (key ``watch``) lists the audits started and retried, with links to them.
    """
    logger = get_run_logger()
    found = {audit_key(c, role, params): c for c in list_checkpoints(source)}
    done, problems = [], []
    with get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name(deployment).id
        known = _runs_by_key(client, deployment_id, list(found))
        for key, checkpoint in found.items():
            audit = params.model_copy(update={role: checkpoint.spec})
            run = known.get(key)
            if run is None:
                if problem := _problem(audit):
                    problems.append(f"{checkpoint.spec}: {problem}")
                    continue
                run = run_deployment(
                    deployment_id,
                    parameters={"params": audit.model_dump(mode="json")},
                    idempotency_key=key,
                    timeout=0,
                    as_subflow=False,
                )
                action = "started"
            elif run.state.type in (StateType.FAILED, StateType.CRASHED):
                if run.run_count > max_retries:
                    logger.warning(
                        "%s: audit %s gave up after %d runs",
                        checkpoint.spec,
                        run.name,
                        run.run_count,
                    )
                    continue
                client.set_flow_run_state(run.id, AwaitingRetry(message="retried by watch"))
                action = "retried"
            else:
                continue
            logger.info("%s: audit %s %s", checkpoint.spec, run.name, action)
            done.append(
                {
                    "checkpoint": checkpoint.spec,
                    "audit": run.name,
                    "action": action,
                    "link": _ui_link(run.id),
                    "flow_run": str(run.id),
                    "key": key,
                }
            )
    create_table_artifact(done, key="watch", description=f"audits of {source}")
    logger.info("%s: %d checkpoints, %d audits started or retried", source, len(found), len(done))
    if problems:
        raise ValueError(
            f"{len(problems)} audit(s) not started, each would fail at once:\n  - "
            + "\n  - ".join(problems)
        )
    return done
