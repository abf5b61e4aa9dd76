"""Faults: a worker killed in the middle of extraction, a stage that keeps failing, the store
unreachable for a while, two audits of one checkpoint at once, `verify`, and determinism.

One clean audit of the tiny model (module-scoped) is the reference the faulty runs are held to.
Subprocesses talk to the session's Prefect server, so none starts one of its own.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prefect import flow, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL

from flows.audit import audit_checkpoint
from tasks._stage import FAULTS_ENV
from tasks.extract import extract
from tasks.metrics import TABLE
from unlearning_audit import cli
from unlearning_audit.config import AuditParams
from unlearning_audit.metrics import table
from unlearning_audit.store import MANIFEST, ArtifactRef, Store, filesystem

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "faults-bucket"

# A worker that runs the extract stage and hangs once the artifact's first file has landed in
# the store, so that it can be killed while the artifact is half written.
STALLING_EXTRACT = """
import sys, time
from prefect import flow
from tasks.extract import extract
from unlearning_audit import store
from unlearning_audit.store import ArtifactRef

url, checkpoint, data, rows = sys.argv[1:]
moved = store._moved  # a local store moves a build's files into the writer folder

def move_then_hang(src, dest):
    moved(src, dest)
    time.sleep(600)

store._moved = move_then_hang
refs = [ArtifactRef.model_validate_json(r) for r in (checkpoint, data)]

@flow
def worker():
    return extract(url, *refs, None, int(rows), "cpu")

worker()
"""


@pytest.fixture(scope="module")
def params(small_audit) -> AuditParams:
    """The smallest audit with every kind of stage (conftest.small_audit), named."""
    return small_audit.model_copy(update={"name": "faults"})


@pytest.fixture(scope="module")
def clean(prefect_server, params, tmp_path_factory) -> Store:
    """The store of one clean audit: the reference."""
    url = str(tmp_path_factory.mktemp("clean") / "store")
    audit_checkpoint(params.model_copy(update={"store": url}))
    return Store(url)


@flow
def _extract(store: str, checkpoint: ArtifactRef, data: ArtifactRef, rows: int) -> ArtifactRef:
    """The extract stage alone, as the audit calls it."""
    return extract(store, checkpoint, data, None, rows, "cpu")


def _subprocess_env() -> dict[str, str]:
    """This environment, with the session's Prefect API and the repository importable."""
    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(ROOT)}


def _refs(store: Store, stage: str) -> dict[str, ArtifactRef]:
    """Every artifact of a stage by key, as references."""
    return {m["key"]: ArtifactRef(key=m["key"], hash=m["hash"]) for m in store.manifests(stage)}


def _wait_for(found: Callable[[], list[Path]], proc: subprocess.Popen, log: Path) -> list[Path]:
    """What ``found`` returns once it is not empty; fails if the process ends first."""
    deadline = time.monotonic() + 300
    while not (paths := found()):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the worker never started writing"
        time.sleep(0.05)
    return paths


def test_worker_killed_mid_extraction_leaves_nothing_complete_and_rerun_matches(
    clean, params, tmp_path, capsys
):
    """SIGKILL while the activations are half uploaded; the rerun writes them bit for bit as
    the clean run did; `verify` finds the killed writer's folder and --repair removes it."""
    root = tmp_path / "store"
    (data,), (checkpoint,) = (_refs(clean, stage).values() for stage in ("data", "checkpoint"))
    for ref in (data, checkpoint):  # the stages before extraction, as the clean run left them
        shutil.copytree(Path(clean.root, ref.key), root / ref.key)
    rows = str(params.data.eval_max_rows)
    argv = [str(root), checkpoint.model_dump_json(), data.model_dump_json(), rows]
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen(
            [sys.executable, "-c", STALLING_EXTRACT, *argv],
            env=_subprocess_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        written = _wait_for(  # in a writer folder, not the build's (ua-*) beside it
            lambda: [
                p
                for p in root.glob("activations/*/*/**/*")
                if p.is_file() and not p.relative_to(root).parts[2].startswith("ua-")
            ],
            worker,
            log,
        )
    finally:
        worker.kill()  # SIGKILL: no handler, no cleanup, as when a node dies
    assert worker.wait(timeout=30) == -signal.SIGKILL
    writer = written[0].relative_to(root).parts[:3]
    key, store = "/".join(writer[:2]), Store(str(root))
    assert (root / key).is_dir() and not (root / key / MANIFEST).exists()
    assert store.manifest(key) is None and store.get(key) is None  # nothing reads as complete

    ref = _extract(str(root), checkpoint, data, int(rows))
    # the clean run's activations of this checkpoint: same inputs, so the same key there
    expected = clean.get(key)
    assert expected is not None
    assert clean.manifest(key)["meta"]["inputs"]["checkpoint"] == checkpoint.hash
    assert ref.key == key and ref.hash == expected.hash  # the clean run's content
    for name in store.manifest(key)["files"]:
        assert store.read_bytes(ref, name) == clean.read_bytes(expected, name), name

    assert cli.main(["verify", "--store", str(root)]) == 0  # too young: may still be writing
    assert cli.main(["verify", "--store", str(root), "--orphan-minutes", "0"]) == 1
    assert f"orphan: {'/'.join(writer)}: no manifest names it" in capsys.readouterr().out
    repair = ["verify", "--store", str(root), "--orphan-minutes", "0", "--repair"]
    assert cli.main(repair) == 0
    assert f"removed {'/'.join(writer)}" in capsys.readouterr().out
    assert not root.joinpath(*writer).exists() and store.check_integrity(orphan_age=0) == []
    assert Store(str(root)).read_bytes(ref, "activations.json")  # the good copy is untouched


def test_failing_stage_is_retried_then_fails_with_its_cause_in_the_logs(
    prefect_server, tmp_path, monkeypatch
):
    attempts = extract.retries + 1
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"extract": ["error"] * attempts}))
    monkeypatch.setenv(FAULTS_ENV, str(faults))
    missing = ArtifactRef(key="checkpoint/absent", hash="0" * 64)  # the faults fire first
    state = _extract(str(tmp_path / "store"), missing, missing, 10, return_state=True)
    assert state.is_failed()
    APILogHandler().flush()  # send this process's queued logs to the API before reading them
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        (task_run,) = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200
        )
    assert task_run.run_count == attempts and task_run.state.is_failed()
    assert "injected failure of extract" in task_run.state.message
    text = "\n".join(log.message for log in logs)
    for retry in range(1, attempts):
        assert f"RuntimeError('injected failure of extract') - Retry {retry}/" in text, text
    assert "RuntimeError('injected failure of extract') - Retries are exhausted" in text
    assert "Traceback" in text and "RuntimeError: injected failure of extract" in text
    assert json.loads(faults.read_text()) == {"extract": []}  # every planned attempt ran
    assert not list((tmp_path / "store").rglob(MANIFEST))


def test_store_unreachable_for_a_while_is_retried_with_backoff(
    s3_server, tmp_path, monkeypatch, caplog
):
    """The S3 server goes away and comes back 1.5 s later, on its own: the store backs off
    (0.3 s, 0.6 s, 1.2 s ...) and the stage's write completes."""
    monkeypatch.setenv("UNLEARNING_AUDIT_STORE_RETRIES", "6")
    monkeypatch.setenv("UNLEARNING_AUDIT_STORE_BACKOFF", "0.3")
    url = f"s3://{BUCKET}/audits"
    filesystem(url)[0].mkdir(BUCKET)
    store = Store(url, cache_dir=tmp_path / "cache")

    def build(out: Path) -> None:
        (out / "part.bin").write_bytes(b"activations" * 1000)

    s3_server.stop()
    restart = threading.Timer(1.5, s3_server.start)
    restart.start()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="unlearning_audit.store"):
        ref, cached = store.cached("outage", {}, {}, "v", build)
    elapsed = time.monotonic() - start
    restart.join()
    delays = [float(d) for d in re.findall(r"; retry \d of 5 in ([\d.]+)s", caplog.text)]
    assert delays[:3] == [0.3, 0.6, 1.2] and len(delays) < 5, caplog.text
    assert elapsed >= 1.5 and not cached
    fresh = Store(url, cache_dir=tmp_path / "other-machine")
    assert fresh.read_bytes(ref, "part.bin") == b"activations" * 1000
    assert fresh.check_integrity(orphan_age=0) == []


def test_verify_reports_artifacts_that_do_not_verify_and_repair_removes_them(tmp_path, capsys):
    """A changed file, a missing file and a manifest that no longer parses: each reported by
    `verify` (exit 1), removed by --repair, and then simply built again by the next run."""
    store = Store(str(tmp_path / "store"))

    def build(out: Path) -> None:
        (out / "a.txt").write_text("payload")

    refs = [store.cached("stage", {"n": n}, {}, "v", build)[0] for n in range(4)]
    folders = [Path(store.root, r.key, store.manifest(r.key)["data"]) for r in refs]
    (folders[0] / "a.txt").write_text("tampered")
    (folders[1] / "a.txt").unlink()
    Path(store.root, refs[2].key, MANIFEST).write_text('{"hash": ')
    assert cli.main(["verify", "--store", store.url]) == 1
    out = capsys.readouterr().out
    assert f"corrupt: {refs[0].key}: a.txt does not match its sha256" in out
    assert f"corrupt: {refs[1].key}: a.txt is missing" in out
    assert f"corrupt: {refs[2].key}: {MANIFEST} is not a valid manifest" in out
    assert refs[3].key not in out and "3 problem(s)" in out
    assert cli.main(["verify", "--store", store.url, "--repair"]) == 0
    assert cli.main(["verify", "--store", store.url]) == 0
    assert [Store(store.url).get(r.key) for r in refs] == [None, None, None, refs[3]]
    again = [store.cached("stage", {"n": n}, {}, "v", build) for n in range(3)]
    assert again == [(ref, False) for ref in refs[:3]]  # rebuilt, to the same content


@pytest.fixture(scope="module")
def concurrent(prefect_server, params, tmp_path_factory) -> tuple[Store, list[str], list[Path]]:
    """Two `unlearning-audit audit` processes with the same parameters and store, started at
    once: the store, each one's output and its rows (--json)."""
    folder = tmp_path_factory.mktemp("concurrent")
    store = Store(str(folder / "store"))
    config = folder / "params.json"
    config.write_text(params.model_copy(update={"store": store.url}).model_dump_json())
    logs, rows, workers = [folder / f"audit-{i}.log" for i in (0, 1)], [], []
    for i, log in enumerate(logs):
        rows.append(folder / f"rows-{i}.json")
        argv = ["audit", "--original", "embedded", "--config", str(config), "--json", str(rows[i])]
        with open(log, "w") as out:
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "unlearning_audit.cli", *argv],
                    env=_subprocess_env(),
                    cwd=folder,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    for worker, log in zip(workers, logs, strict=True):
        assert worker.wait(timeout=600) == 0, log.read_text()[-3000:]
    return store, [log.read_text() for log in logs], rows


def test_two_audits_of_one_checkpoint_at_once_share_artifacts_and_stay_consistent(concurrent):
    store, outputs, rows = concurrent
    stored = {m["key"] for m in store.manifests()}
    for out in outputs:  # each audit used every artifact, whichever process built it
        used = re.findall(r": (?:computed and stored|served from the store) \((\S+)\)", out)
        assert set(used) == stored
    reports = [re.search(r"^report: (.+)$", out, re.MULTILINE).group(1) for out in outputs]
    assert reports[0] == reports[1]
    assert json.loads(rows[0].read_text()) == json.loads(rows[1].read_text())
    assert store.check_integrity(orphan_age=0) == []  # every manifest verifies; no leftovers
    for manifest in store.manifests():  # one data folder per key: the losers removed theirs
        folders = [p.name for p in Path(store.root, manifest["key"]).iterdir() if p.is_dir()]
        assert folders == [manifest["data"]], manifest["key"]


def _metrics_tables(store: Store) -> list[list[dict]]:
    """Every metrics table of a store (unlearned and relearned against the original), sorted."""
    tables = []
    for ref in _refs(store, "metrics").values():
        with store.open(ref, TABLE) as f:
            tables.append(table.read(f))
    return sorted(tables, key=json.dumps)


def test_two_clean_runs_with_one_seed_give_identical_metrics_tables(clean, params, tmp_path):
    second = Store(str(tmp_path / "store"))
    audit_checkpoint(params.model_copy(update={"store": second.url}))
    first_tables = _metrics_tables(clean)
    assert len(first_tables) == 2 and all(first_tables)
    assert _metrics_tables(second) == first_tables
    hashes = [sorted(r.hash for r in _refs(s, "metrics").values()) for s in (clean, second)]
    assert hashes[0] == hashes[1]  # the Parquet files, byte for byte
