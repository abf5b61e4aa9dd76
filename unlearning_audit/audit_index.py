"""The store's index of finished audits and studies: a rerun of an audit (or a study) whose every
input is unchanged is answered from its stored report in seconds, without starting Prefect.

An entry (stage ``audit``) is keyed by everything the audit's result depends on (``identity``):
its parameters (the store's URL aside), the precision and device kind it resolves to on this
machine, the content of every checkpoint it names (checkpoints.identity: file hashes, ETags or
the hub commit) and of its data (data.identity of the rows; the embedded corpus by its config),
and the source of every module of the package, its stages and flows, with the versions of the
libraries that compute. It holds the reference of the report the audit stored. Any change, a
checkpoint's byte included, is a new key, so the audit then runs (its unchanged stages still
served from the store). The entry is written by the CLI after an audit completes.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from . import checkpoints, data, runtime
from .config import AuditParams, StudyParams
from .store import ArtifactRef, Store, code_version

STAGE = "audit"
ENTRY = "report.json"
LIBRARIES = ("torch", "transformers", "peft", "scikit-learn", "numpy", "pyarrow", "prefect")


def identity(params: AuditParams) -> dict:
    """What the audit's result depends on (see the module docstring); reads every checkpoint
    and data source it names, as the audit itself would."""
    device = runtime.resolve_device(params.device)
    specs = {"original": params.original, "unlearned": params.unlearned, "control": params.control}
    return {
        "params": params.model_dump(mode="json", exclude={"store"}),
        "precision": runtime.resolve_precision(params.precision, params.device),
        "device": device.type,
        "checkpoints": {
            role: _checkpoint_identity(spec, params.allow_pickle)
            for role, spec in specs.items()
            if spec is not None
        },
        "data": data.identity(data.external_sets(params.data)) if params.data.external else None,
        "code": _code(),
    }


def study_identity(params: StudyParams) -> dict:
    """What a study's result depends on: its parameters (the store's URL aside), the precision
    and device kind its audits resolve to here, and the code (a study audits the embedded
    model alone, whose identity is its config)."""
    return {
        "study": params.model_dump(mode="json", exclude={"store"}),
        "precision": runtime.resolve_precision("auto", params.device),
        "device": runtime.resolve_device(params.device).type,
        "code": _code(),
    }


def _checkpoint_identity(spec: str, allow_pickle: bool) -> dict | str:
    """A checkpoint's content identity (the embedded one is its config, in the params)."""
    parsed = checkpoints.parse(spec)
    if parsed.kind == "embedded":
        return "embedded"
    return checkpoints.identity(checkpoints.pin(parsed), allow_pickle)


def _code() -> dict:
    """The source of the package, its stages and flows, and the computing libraries' versions."""
    import flows
    import tasks
    import unlearning_audit

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"source": code_version(unlearning_audit, tasks, flows), "libraries": versions}


def find(store: Store, audit: dict) -> ArtifactRef | None:
    """The stored report of the audit whose identity is ``audit``, verified; None where there
    is none (or it, or its index entry, no longer verifies)."""
    entry = store.get(Store.key_for(STAGE, audit, {}, ""))
    if entry is None:
        return None
    report = ArtifactRef.model_validate_json(store.read_bytes(entry, ENTRY))
    found = store.get(report.key)
    return found if found == report else None


def record(store: Store, audit: dict, report: ArtifactRef) -> ArtifactRef:
    """Index ``report``, stored by the audit whose identity is ``audit``."""

    def build(out: Path) -> None:
        (out / ENTRY).write_text(json.dumps(report.model_dump()))

    return store.cached(STAGE, audit, {}, "", build)[0]
