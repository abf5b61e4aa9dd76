"""The watch flow: checkpoint sources are listed, and every checkpoint is audited exactly once."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from types import SimpleNamespace

import archs
import fsspec
import pytest
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactCollectionFilter,
    ArtifactCollectionFilterKey,
    DeploymentFilter,
    DeploymentFilterId,
)
from prefect.deployments import run_deployment
from prefect.states import Crashed, Failed, Pending, Running

from flows.watch import audit_key, list_checkpoints, watch
from unlearning_audit.config import AuditParams, DataConfig, UnlearnConfig


def _checkpoint(folder: Path, weights: bytes = b"w") -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_local_source_lists_checkpoint_folders_only(tmp_path):
    a, b = _checkpoint(tmp_path / "step-100"), _checkpoint(tmp_path / "step-200")
    (tmp_path / "notes").mkdir()
    (tmp_path / "README.md").write_text("not a checkpoint")
    found = list_checkpoints(str(tmp_path))
    assert [c.spec for c in found] == [str(a), str(b)]
    assert set(found[0].identity) == {"config.json", "model.safetensors"}


def test_rewritten_checkpoint_has_a_new_key(tmp_path):
    folder = _checkpoint(tmp_path / "ckpt")
    params = AuditParams()
    (before,) = list_checkpoints(str(tmp_path))
    (folder / "model.safetensors").write_bytes(b"retrained")
    os.utime(folder / "model.safetensors", ns=(1, 1))
    (after,) = list_checkpoints(str(tmp_path))
    assert audit_key(before, "original", params) == audit_key(before, "original", params)
    assert audit_key(before, "original", params) != audit_key(after, "original", params)
    assert audit_key(before, "original", params) != audit_key(before, "unlearned", params)
    other = params.model_copy(update={"seed": 1})
    assert audit_key(before, "original", params) != audit_key(before, "original", other)


def test_url_source_lists_prefixes_with_a_config():
    fs = fsspec.filesystem("memory")
    for name in ("a", "b"):
        fs.pipe(f"/watch-src/{name}/config.json", b"{}")
        fs.pipe(f"/watch-src/{name}/model.safetensors", b"w" * len(name))
    fs.pipe("/watch-src/logs/train.log", b"x")
    try:
        found = list_checkpoints("memory://watch-src/")
    finally:
        fs.rm("/watch-src", recursive=True)
    assert [c.spec for c in found] == ["memory://watch-src/a", "memory://watch-src/b"]
    assert found[0].identity == {"config.json": "2", "model.safetensors": "1"}


def test_hub_source_lists_each_revision_once(monkeypatch):
    import huggingface_hub

    refs = SimpleNamespace(
        branches=[
            SimpleNamespace(name="main", target_commit="c2"),
            SimpleNamespace(name="step-1000", target_commit="c1"),
        ],
        tags=[SimpleNamespace(name="v1", target_commit="c2")],
    )
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_refs", lambda self, repo: refs)
    found = list_checkpoints("org/model")
    assert [c.spec for c in found] == ["org/model@c1", "org/model@c2"]


def test_unknown_source_is_an_error():
    with pytest.raises(ValueError, match="no such folder"):
        list_checkpoints("no-such-folder")


@pytest.fixture
def audit_deployment(prefect_server) -> str:
    """An `audit` deployment of its own (the server is the session's) with no work pool: its
    runs are created and wait, never run."""
    name = f"watched-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("audit-checkpoint")
        client.create_deployment(flow_id=flow_id, name=name, enforce_parameter_schema=False)
    return f"audit-checkpoint/{name}"


def _audits(name: str) -> list:
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(name)
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        )


def _real_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A tiny Llama checkpoint an audit can start from (preflight reads and renders it)."""
    tok = archs.tokenizer(["Who wrote Q0?", "Who wrote R?", "A", "B"])
    return archs.save(archs.model("llama", tok, seed), tok, folder)


@pytest.fixture
def template(data_files, tmp_path) -> AuditParams:
    """A valid audit template for a user checkpoint: data, a method, a store."""
    return AuditParams(
        name="watched",
        data=DataConfig(forget=data_files["forget"], retain=data_files["retain"]),
        methods=[UnlearnConfig(method="GA", lr=1e-5, steps=1)],
        store=str(tmp_path / "store"),
    )


def test_two_watch_runs_start_each_audit_once(audit_deployment, template, tmp_path):
    source = tmp_path / "checkpoints"
    a, b = _real_checkpoint(source / "a"), _real_checkpoint(source / "b", 1)
    first = watch(str(source), params=template, deployment=audit_deployment)
    second = watch(str(source), params=template, deployment=audit_deployment)
    runs = _audits(audit_deployment)
    assert len(first) == 2 and second == []
    assert len(runs) == 2
    assert {r.parameters["params"]["original"] for r in runs} == {str(a), str(b)}
    assert {r.idempotency_key for r in runs} == {s["key"] for s in first}
    assert {s["action"] for s in first} == {"started"}
    # two watch runs at once both try to start it: the key makes it the same run
    again = run_deployment(audit_deployment, idempotency_key=first[0]["key"], timeout=0)
    assert str(again.id) == first[0]["flow_run"]

    c = _real_checkpoint(source / "c", 2)
    (third,) = watch(str(source), params=template, deployment=audit_deployment)
    assert third["checkpoint"] == str(c)
    assert len(_audits(audit_deployment)) == 3


def test_an_invalid_template_fails_the_watch_and_starts_nothing(audit_deployment, tmp_path):
    """The default template has no data for a user checkpoint: every audit would fail at once,
    so none starts and the watch run fails, naming the problem per checkpoint."""
    source = tmp_path / "checkpoints"
    _real_checkpoint(source / "a")
    state = watch(
        str(source),
        params=AuditParams(store=str(tmp_path / "store")),
        deployment=audit_deployment,
        return_state=True,
    )
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "1 audit(s) not started" in message
    assert "needs forget and retain sources" in message
    assert _audits(audit_deployment) == []


def test_failed_audits_are_retried_up_to_a_limit(audit_deployment, template, tmp_path):
    """A failed audit is retried (AwaitingRetry, as the UI's Retry), a crashed one too; one
    that ran more than max_retries times is left alone. The watch's table artifact links each
    audit it started or retried."""
    source = tmp_path / "checkpoints"
    _real_checkpoint(source / "a")
    (started,) = watch(str(source), params=template, deployment=audit_deployment)
    with get_client(sync_client=True) as client:
        for state in (Pending(), Running(), Failed(message="a stage failed")):
            client.set_flow_run_state(started["flow_run"], state)
    (retried,) = watch(str(source), params=template, deployment=audit_deployment)
    assert (retried["action"], retried["flow_run"]) == ("retried", started["flow_run"])
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(started["flow_run"])
        assert run.state.name == "AwaitingRetry"
        for state in (Pending(), Running(), Crashed(message="worker lost")):
            client.set_flow_run_state(run.id, state)
        assert client.read_flow_run(run.id).run_count == 2
    assert watch(str(source), params=template, deployment=audit_deployment, max_retries=1) == []
    state = watch(str(source), params=template, deployment=audit_deployment, return_state=True)
    (again,) = state.result()
    assert again["action"] == "retried"
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(
                key=ArtifactCollectionFilterKey(any_=["watch"])
            )
        )[0]
    (row,) = json.loads(artifact.data)
    assert row["flow_run"] == started["flow_run"] and row["flow_run"] in row["link"]
