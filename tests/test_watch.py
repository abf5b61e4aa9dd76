"""The watch flow: checkpoint sources are listed, and every checkpoint is audited exactly once."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pytest
from prefect import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.deployments import run_deployment

from flows.watch import audit_key, list_checkpoints, watch
from unlearning_audit.config import AuditParams


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
    """An `audit` deployment with no work pool: its runs are created and wait, never run."""
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("audit-checkpoint")
        client.create_deployment(flow_id=flow_id, name="watched", enforce_parameter_schema=False)
    return "audit-checkpoint/watched"


def _audits(name: str) -> list:
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(name)
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        )


def test_two_watch_runs_start_each_audit_once(audit_deployment, tmp_path):
    a, b = _checkpoint(tmp_path / "a"), _checkpoint(tmp_path / "b")
    params = AuditParams(name="watched")
    first = watch(str(tmp_path), params=params, deployment=audit_deployment)
    second = watch(str(tmp_path), params=params, deployment=audit_deployment)
    runs = _audits(audit_deployment)
    assert len(first) == 2 and second == []
    assert len(runs) == 2
    assert {r.parameters["params"]["original"] for r in runs} == {str(a), str(b)}
    assert {r.idempotency_key for r in runs} == {s["key"] for s in first}
    # two watch runs at once both try to start it: the key makes it the same run
    again = run_deployment(audit_deployment, idempotency_key=first[0]["key"], timeout=0)
    assert str(again.id) == first[0]["flow_run"]

    c = _checkpoint(tmp_path / "c")
    (third,) = watch(str(tmp_path), params=params, deployment=audit_deployment)
    assert third["checkpoint"] == str(c)
    assert len(_audits(audit_deployment)) == 3
