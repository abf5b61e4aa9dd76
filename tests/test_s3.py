"""The audit on a real S3-compatible HTTP server (moto, on 127.0.0.1) through s3fs.

One server and one audit per module: every stage's artifact on ``s3://bucket/prefix``, a second
process that recomputes the metrics from the store alone, the server stopped in the middle of a
Parquet upload, a corrupted object recomputed, Prefect result storage on the same store, the
ls/show commands, a checkpoint fetched from an S3 prefix, and fake credentials nowhere to be found.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import S3Server
from prefect import flow, get_client
from prefect.settings import (
    PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK,
    PREFECT_RESULTS_PERSIST_BY_DEFAULT,
    temporary_settings,
)

from flows.audit import audit_checkpoint
from tasks.checkpoint import fetch_checkpoint
from tasks.extract import extract
from tasks.metrics import TABLE
from unlearning_audit import checkpoints, cli
from unlearning_audit.config import AuditParams, RelearnConfig, UnlearnConfig
from unlearning_audit.metrics import table
from unlearning_audit.store import MANIFEST, ArtifactRef, Store, StoreUnavailable, filesystem

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "audit-bucket"
URL = f"s3://{BUCKET}/audits"
KEY_ID = "AKIAUNLEARNAUDITFAKE7"
SECRET = "Un1earn/Audit+Fake/Secret/9f8e7d6c5b4a"
STAGES = {
    "data",
    "checkpoint",
    "unlearn",
    "evaluate",
    "fisher",
    "relearn",
    "activations",
    "metrics",
    "verdict",
    "report",
}


class Lines(logging.Handler):
    """Every log line of the module's runs, formatted, to search for credentials."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server, the AWS environment (fake credentials, fast failures) and the bucket."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = S3Server()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "AWS_ENDPOINT_URL": server.endpoint,
            "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_MAX_ATTEMPTS": "1",
            "UNLEARNING_AUDIT_STORE_RETRIES": "3",
            "UNLEARNING_AUDIT_STORE_BACKOFF": "0.05",
            "UNLEARNING_AUDIT_CACHE": str(tmp_path_factory.mktemp("cache")),
        }.items():
            mp.setenv(name, value)
        filesystem(URL)[0].mkdir(BUCKET)
        yield server
    server.stop()


@pytest.fixture(scope="module", autouse=True)
def logs(s3):
    """Log lines at INFO and above from every logger, from the module's first test to its last."""
    handler, root = Lines(), logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    for name in ("", "prefect"):
        logging.getLogger(name).addHandler(handler)
    yield handler.lines
    for name in ("", "prefect"):
        logging.getLogger(name).removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="module")
def params(tiny) -> AuditParams:
    """The tiny audit of test_flow.py; without linear probes, which read the store as metrics
    does (activations through local_dir) but take most of the run's time, and with one
    relearning seed (more add round trips, not coverage)."""
    return AuditParams(
        embedded=tiny,
        store=URL,
        name="s3 audit",
        methods=[UnlearnConfig(method="GA", lr=1e-3, steps=10)],
        relearn=RelearnConfig(seeds=1),
        probes=False,
    )


@pytest.fixture(scope="module")
def audit(s3, logs, prefect_server, params):
    """`setup` saves the result storage block; the audit then runs with results persisted to it."""
    assert cli.main(["setup", "--store", URL]) == 0
    slug = f"remote-file-system/{cli.RESULT_BLOCK}"
    with temporary_settings(
        {PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: slug, PREFECT_RESULTS_PERSIST_BY_DEFAULT: True}
    ):
        state = audit_checkpoint(params, return_state=True)
    assert state.is_completed(), state.message
    return state


def _store(tmp_path: Path | None = None) -> Store:
    """A reader of the S3 store; with ``tmp_path``, one with an empty cache (a fresh machine)."""
    return Store(URL, cache_dir=tmp_path / "fresh-cache" if tmp_path else None)


def _by_stage(store: Store, stage: str) -> list[dict]:
    return list(store.manifests(stage))


def test_every_stage_is_stored_on_s3(audit):
    result = audit.result()
    store = _store()
    assert {m["stage"] for m in store.manifests()} >= STAGES
    assert result["report_file"].startswith(f"{URL}/report/")
    (report,) = _by_stage(store, "report")
    ref = ArtifactRef(key=report["key"], hash=report["hash"])
    (row,) = result["rows"]
    assert row["regime"] in store.read_bytes(ref, "report.md").decode()
    assert report["meta"]["name"] == "s3 audit"


def test_result_storage_block_is_on_the_same_store(audit, s3):
    from prefect.filesystems import RemoteFileSystem

    block = RemoteFileSystem.load(cli.RESULT_BLOCK)
    assert block.basepath == f"{URL}/prefect-results"
    assert block.settings == {"endpoint_url": s3.endpoint}
    fs = filesystem(URL)[0]
    fs.invalidate_cache()
    assert fs.find(f"{BUCKET}/audits/prefect-results"), "no Prefect result was persisted"


RECOMPUTE = """
import sys
from tasks.extract import PROBE_SETS, SUMMARY
from unlearning_audit import runtime
from unlearning_audit.metrics import table
from unlearning_audit.store import ArtifactRef, Store

url, out = sys.argv[1:3]
store = Store(url)
refs = {m["hash"]: ArtifactRef(key=m["key"], hash=m["hash"]) for m in store.manifests()}
for manifest in store.manifests("metrics"):
    runtime.setup(0, "cpu")
    inputs = manifest["meta"]["inputs"]
    x, y = (refs[inputs[name]] for name in ("original_acts", "candidate_acts"))
    layers, k = store.read_json(x, SUMMARY)["layers"], manifest["meta"]["config"]["k"]
    folders = store.local_dir(x), store.local_dir(y)
    rows = table.activation_rows(*folders, list(PROBE_SETS), layers, k)
    table.write(rows, f"{out}/{manifest['key'].replace('/', '_')}.parquet")
"""


def test_second_process_recomputes_the_metrics_identically(audit, s3, tmp_path):
    """A fresh process with only the store URL and the endpoint's environment reads the
    activations from S3 and recomputes every activation metric, bit for bit."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "UNLEARNING_AUDIT_THREADS": os.environ["UNLEARNING_AUDIT_THREADS"],
        "UNLEARNING_AUDIT_CACHE": str(tmp_path / "other-machine-cache"),
        "AWS_ENDPOINT_URL": s3.endpoint,
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    out = tmp_path / "recomputed"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", RECOMPUTE, URL, str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    store = _store()
    stored = _by_stage(store, "metrics")
    assert len(stored) == 2
    for manifest in stored:
        ref = ArtifactRef(key=manifest["key"], hash=manifest["hash"])
        recomputed = table.read(out / f"{manifest['key'].replace('/', '_')}.parquet")
        names = {r["metric"] for r in recomputed}
        assert {"cka", "cka_debiased", "pca_similarity", "pca_distance"} <= names
        with store.open(ref, TABLE) as f:
            assert recomputed == [r for r in table.read(f) if r["metric"] in names]
    assert any((tmp_path / "other-machine-cache").iterdir())  # it read the store, not our cache


def test_ls_lists_audits_and_show_prints_the_report(audit, capsys):
    assert cli.main(["ls", "--store", URL]) == 0
    listing = capsys.readouterr().out
    (report,) = _by_stage(_store(), "report")
    assert "s3 audit" in listing and report["key"] in listing and "embedded" in listing
    assert all(stage + "/" in listing for stage in STAGES)
    assert cli.main(["ls", "--store", URL, "--stage", "metrics"]) == 0
    metrics_only = capsys.readouterr().out
    assert "metrics/" in metrics_only and "checkpoint/" not in metrics_only
    assert cli.main(["show", report["key"], "--store", URL]) == 0
    shown = capsys.readouterr().out
    assert json.loads(shown.split("\n--- report.md\n")[0])["hash"] == report["hash"]
    assert "## Thresholds" in shown
    assert cli.main(["show", "report/nonexistent", "--store", URL]) == 2


@flow
def _fetch(store: str, spec: str, config) -> ArtifactRef:
    return fetch_checkpoint(store, spec, config, return_state=True).result()


def test_checkpoint_fetched_from_an_s3_prefix_records_its_source(audit, params, tmp_path):
    store = _store()
    (original,) = [m for m in _by_stage(store, "checkpoint") if m["meta"]["source"] == "embedded"]
    folder = store.local_dir(ArtifactRef(key=original["key"], hash=original["hash"]))
    local = tmp_path / "model"
    local.mkdir()
    for name in original["files"]:
        if checkpoints.wanted(name, allow_pickle=False):
            (local / name).write_bytes((folder / name).read_bytes())
            store.fs.put_file(str(local / name), f"{BUCKET}/models/tiny/{name}")
    from_s3 = _fetch(URL, f"s3://{BUCKET}/models/tiny", params.embedded)
    from_folder = _fetch(URL, str(local), params.embedded)
    assert from_s3.hash == from_folder.hash and from_s3.key != from_folder.key
    manifest = store.manifest(from_s3.key)
    assert manifest["meta"]["source"] == f"s3://{BUCKET}/models/tiny"
    assert set(manifest["files"]) == {p.name for p in local.iterdir()}
    model, _ = checkpoints.load(_store(tmp_path).local_dir(from_s3))
    assert model.config.num_hidden_layers == params.embedded.layers


def test_corrupted_object_is_detected_and_recomputed(audit, params, tmp_path, monkeypatch, caplog):
    store = _store()
    before = {m["key"]: m for m in store.manifests()}
    victim = sorted(k for k in before if k.startswith("metrics/"))[0]
    data = before[victim]["data"]
    store.fs.pipe(f"{BUCKET}/audits/{victim}/{data}/{TABLE}", b"not parquet at all")
    monkeypatch.setenv("UNLEARNING_AUDIT_CACHE", str(tmp_path / "fresh-cache"))
    with caplog.at_level(logging.WARNING, logger="unlearning_audit.store"):
        state = audit_checkpoint(params, return_state=True)
    assert state.is_completed()
    assert f"ignoring corrupt artifact: {victim}: {TABLE} does not match its sha256" in caplog.text
    after = {m["key"]: m for m in store.manifests()}
    assert after[victim]["hash"] == before[victim]["hash"]  # recomputed, to the same content
    assert after[victim]["data"] != data  # in a new data folder; the corrupt one is gone
    assert not store.fs.exists(f"{BUCKET}/audits/{victim}/{data}")
    changed = {k for k in before if after[k]["data"] != before[k]["data"]}
    assert changed == {victim}
    assert _store(tmp_path / "check").get(victim) is not None


@flow
def _extract(store: str, checkpoint: ArtifactRef, data_ref: ArtifactRef) -> ArtifactRef:
    stage = extract.with_options(retries=0)
    return stage(store, checkpoint, data_ref, None, 50, "cpu", return_state=True).result()


def test_server_stopped_mid_parquet_upload(audit, s3, tmp_path, monkeypatch):
    """The server stops after the first part of a multipart Parquet upload has landed."""
    import moto.s3.models

    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", 1024)
    monkeypatch.setenv("UNLEARNING_AUDIT_PART_SIZE_MB", str(4 / 1024))  # 4 KiB parts
    store = _store()
    (checkpoint,) = [m for m in _by_stage(store, "checkpoint") if m["meta"]["source"] == "embedded"]
    (data,) = _by_stage(store, "data")
    refs = [ArtifactRef(key=m["key"], hash=m["hash"]) for m in (checkpoint, data)]
    interrupted: list[str] = []
    real_call = store.fs._call_s3

    async def stop_after_first_part(method, *args, **kwargs):
        out = await real_call(method, *args, **kwargs)
        if method == "upload_part" and kwargs["Key"].endswith(".parquet") and not interrupted:
            interrupted.append(kwargs["Key"])
            s3.stop()
        return out

    monkeypatch.setattr(store.fs, "_call_s3", stop_after_first_part)
    state = _extract(URL, *refs, return_state=True)
    assert interrupted and not s3.running
    with pytest.raises(StoreUnavailable, match=r"upload of activations/.+\.parquet failed after 3"):
        state.result()
    s3.start()
    key = "/".join(interrupted[0].split("/")[1:3])
    assert store.manifest(key) is None and _store(tmp_path).get(key) is None
    assert not store.fs.exists(f"{BUCKET}/{interrupted[0]}")  # the half-sent object never was
    rerun = _extract(URL, *refs, return_state=True)
    assert rerun.is_completed()
    assert rerun.result().key == key and _store(tmp_path / "again").get(key) is not None


DERIVATION = {"inputs": {}, "config": {}, "version": "v"}  # what derives the keys below
RACE = Store.key_for("race", {}, {}, "v")


def test_transient_outage_is_retried_with_backoff(s3, tmp_path, monkeypatch, caplog):
    """The server comes back while the store waits to retry: the write completes."""
    monkeypatch.setenv("UNLEARNING_AUDIT_STORE_RETRIES", "5")
    store = _store(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"payload")

    class RestartOnRetry(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "retry" in record.getMessage() and not s3.running:
                s3.start()

    restart = RestartOnRetry()
    logging.getLogger("unlearning_audit.store").addHandler(restart)
    s3.stop()
    try:
        with caplog.at_level(logging.WARNING, logger="unlearning_audit.store"):
            ref = store.put(Store.key_for("retry", {}, {}, "v"), src, DERIVATION)
    finally:
        logging.getLogger("unlearning_audit.store").removeHandler(restart)
    assert s3.running and "failed (EndpointConnectionError" in caplog.text
    assert "retry 1 of 4" in caplog.text
    assert _store(tmp_path / "other").read_bytes(ref, "a.bin") == b"payload"


def test_racing_writers_of_one_key_leave_one_valid_artifact(s3, tmp_path):
    """Both upload, then both commit at the same instant: the conditional PUT picks one."""
    barrier = threading.Barrier(2)
    results: dict[str, ArtifactRef] = {}

    def write(name: str) -> None:
        store = _store(tmp_path / name)
        src = tmp_path / name / "src"
        src.mkdir(parents=True)
        (src / "a.txt").write_text(f"written by {name}")
        commit = store._write_atomic

        def synchronized(path: str, data: bytes) -> bool:
            barrier.wait(timeout=30)
            return commit(path, data)

        store._write_atomic = synchronized
        results[name] = store.put(RACE, src, DERIVATION)

    threads = [threading.Thread(target=write, args=(n,)) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results["first"] == results["second"]
    reader = _store(tmp_path / "reader")
    winner = reader.read_bytes(results["first"], "a.txt").decode()
    assert winner in {"written by first", "written by second"}
    reader.fs.invalidate_cache()
    folders = [p for p in reader.fs.ls(f"{BUCKET}/audits/{RACE}") if not p.endswith(MANIFEST)]
    assert len(folders) == 1  # the loser removed its copy


def _one_file(out: Path) -> None:
    (out / "x.txt").write_text("x")


def test_corrupt_manifest_is_ignored_and_replaced(s3, tmp_path, caplog):
    store = _store(tmp_path)
    ref, _ = store.cached("probe", {}, {}, "v", _one_file)
    store.fs.pipe(f"{BUCKET}/audits/{ref.key}/{MANIFEST}", b'{"truncated":')
    with caplog.at_level(logging.WARNING, logger="unlearning_audit.store"):
        again, cached = _store(tmp_path / "b").cached("probe", {}, {}, "v", _one_file)
    assert not cached and again == ref
    assert "is not a valid manifest" in caplog.text and "replacing corrupt artifact" in caplog.text
    assert _store(tmp_path / "c").get(ref.key) == ref


def _leaks(blobs: list[bytes]) -> list[int]:
    """Indexes of the blobs that hold the fake key id or secret."""
    needles = (KEY_ID.encode(), SECRET.encode())
    return [i for i, blob in enumerate(blobs) if any(n in blob for n in needles)]


def _all_logs(client) -> list:
    """Every log record the Prefect API holds, page by page."""
    found: list = []
    while page := client.read_logs(limit=200, offset=len(found)):
        found += page
    return found


def test_credentials_appear_in_no_log_object_or_prefect_artifact(audit, logs):
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET  # the runs above used them
    assert _leaks([b"ok", f"x{SECRET}y".encode()]) == [1]  # the search itself works
    assert logs and not _leaks([line.encode() for line in logs])
    fs = filesystem(URL)[0]
    fs.invalidate_cache()
    objects = fs.find(BUCKET)
    assert any("/prefect-results/" in o for o in objects)
    assert not _leaks([fs.cat_file(o) for o in objects])
    with get_client(sync_client=True) as client:
        prefect_records = [
            *(a.model_dump_json() for a in client.read_artifacts()),
            *(r.model_dump_json() for r in client.read_flow_runs()),
            *(log.model_dump_json() for log in _all_logs(client)),
            *(b.model_dump_json() for b in client.read_block_documents()),
        ]
    assert any("s3 audit" in r for r in prefect_records)
    assert not _leaks([r.encode() for r in prefect_records])
