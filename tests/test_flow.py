"""The audit flow end to end on the smallest configuration, and its caching."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import archs
import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.audit import audit_checkpoint
from tasks.splice import SPLICE
from unlearning_audit import audit_index
from unlearning_audit.config import AuditParams, DataConfig, Thresholds, UnlearnConfig
from unlearning_audit.report import INPUTS, SUMMARY_KEYS
from unlearning_audit.splice import DIRECTIONS
from unlearning_audit.store import ArtifactRef, Store
from unlearning_audit.verdict import REGIMES


def _task_states(flow_run_id, timeout: float = 30.0) -> dict[str, list[str]]:
    """Final state names of the flow run's task runs, by task name.

    The server records task states from events, a moment after the flow returns: wait until
    every task run has reached a final state.
    """
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        if all(run.state and run.state.is_final() for run in runs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    states: dict[str, list[str]] = {}
    for run in runs:
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(
            run.state.name if run.state else "no state"
        )
    return states


def test_audit_runs_every_stage_and_reports(first_run, audit_params):
    state, _ = first_run
    result = state.result()
    assert state.is_completed()
    (row,) = result["rows"]
    assert set(SUMMARY_KEYS) <= set(row)
    assert row["regime"] in REGIMES
    # pretraining stops once the forget rows of every domain reach 0.85 together: the text
    # domain's share of them lands near there, on either side
    assert row["forget_original"] >= 0.7 and row["metric"] == "exact_match"
    assert row["headline"].startswith(row["regime"].replace("cannot-relearn", "irreversible"))
    assert 0.0 <= row["mean_cka"] <= 1.0
    # where the edit sits, and the model's Fisher beside the empirical one
    curve = row["depth_share"]  # k = 0..L: the head, then one more block each
    assert len(curve) == audit_params.embedded.layers + 1 and curve[1] == row["depth_share_top1"]
    assert all(0.0 <= a <= b <= 1.0 for a, b in itertools.pairwise(curve))
    assert curve == row["depth_share_untied"] and row["tied_share"] == 0  # an untied head
    assert len(row["depth_share_fisher"]) == len(curve) and row["fisher_ratio_model"] > 0
    assert result["report_file"].endswith("report.md")
    with open(result["report_file"]) as f:
        text = f.read()
    assert "## Thresholds" in text and row["regime"] in text
    # the causal layer test: its stored rows (both directions, k = 0..L), its table, its figure
    assert "Causal layer test (splice)" in text and "splice_restored_top1" in text
    assert "Causal layer test (splice): GA" in Path(result["html_file"]).read_text()
    store = Store(audit_params.store)
    inputs = store.read_json(ArtifactRef(**result["report_ref"]), INPUTS)
    spliced = store.read_json(ArtifactRef(**inputs["references"]["runs"][0]["splice"]), SPLICE)
    blocks = spliced["blocks"]
    assert {(r["direction"], r["k"]) for r in spliced["rows"]} == {
        (d, k) for d in DIRECTIONS for k in range(blocks + 1)
    }
    assert spliced["metric"] == row["metric"]
    for r in spliced["rows"]:
        for name in ("forget", "retain"):
            assert r[name]["lower"] <= r[name]["score"] <= r[name]["upper"]
    unspliced = {r["direction"]: r["forget"]["score"] for r in spliced["rows"] if r["k"] == 0}
    # k = 0 is each model itself, on the evaluate stage's rows, by its scorer
    assert unspliced[DIRECTIONS[0]] == pytest.approx(row["forget_original"])
    assert unspliced[DIRECTIONS[1]] == pytest.approx(row["forget_unlearned"])
    stages = _task_states(state.state_details.flow_run_id)
    for stage in (
        "prepare-data",
        "fetch-checkpoint",
        "unlearn",
        "evaluate",
        "relearn",
        "extract",
        "metrics",
        "splice",
        "verdict",
        "report",
        "publish",
    ):
        assert stage in stages, stage


CHECKS = {"publish", "check-known", "check-compatible"}
"""Tasks that run on every call, cheaply, beside the cached stages: showing the report, and the
checks before any training."""


def test_identical_rerun_is_served_from_cache(first_run, audit_params):
    """Every stage is served from the store; timed as the best of three reruns, since the local
    Prefect server (SQLite) now and then stalls a call for a few seconds: right after a run it
    is still writing that run's events and logs (profiled: the first rerun waited 2-4 s on
    Prefect's threads, a later one ran in about 1 s)."""
    _, first_seconds = first_run
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        state = audit_checkpoint(audit_params, return_state=True)
        timings.append(time.perf_counter() - start)
        states = _task_states(state.state_details.flow_run_id)
        computed = {
            name: s
            for name, s in states.items()
            if name not in CHECKS and any(x != "Cached" for x in s)
        }
        assert computed == {}
        assert state.result()["rows"] == first_run[0].result()["rows"]
    assert min(timings) < 0.1 * first_seconds, (timings, first_seconds)


def test_a_cached_rerun_hashes_no_file_twice(first_run, audit_params, monkeypatch):
    """Every stage verifies the artifacts it reads (the checkpoints above all), each through its
    own Store: a file is still read and hashed once per process, not once per stage."""
    from collections import Counter

    from unlearning_audit import store

    hashed = Counter()

    def counting(f):
        hashed[str(f.name)] += 1
        return original(f)

    original = store._stream_sha256
    monkeypatch.setattr(store, "_stream_sha256", counting)
    monkeypatch.setattr(store, "_HASHED", {})  # as in a fresh process
    audit_checkpoint(audit_params)
    weights = [p for p in hashed if p.endswith("model.safetensors")]
    assert len(weights) >= 3  # the original, its control and the unlearned model at least
    assert max(hashed.values()) == 1, hashed.most_common(3)


def test_threshold_change_reruns_only_verdict_and_report(first_run, audit_params):
    changed = audit_params.model_copy(
        update={"thresholds": Thresholds(forgotten=0.3, control_margin=0.05)}
    )
    state = audit_checkpoint(changed, return_state=True)
    states = _task_states(state.state_details.flow_run_id)
    computed = {name for name, s in states.items() if any(x != "Cached" for x in s)}
    assert computed - CHECKS == {"verdict", "report"}


def test_mode_b_audits_a_saved_unlearned_checkpoint(first_run, audit_params, tmp_path):
    """Auditing the saved output of mode (a) as a given checkpoint reproduces its verdict."""
    from unlearning_audit.store import Store

    store = Store(audit_params.store)
    (manifest,) = list(store.manifests("unlearn"))
    folder = tmp_path / "published-unlearned-model"
    folder.mkdir()
    source = store.local_dir(store.get(manifest["key"]))
    for name in manifest["files"]:
        if name != "unlearn.json":
            (folder / name).write_bytes((source / name).read_bytes())
    given = audit_params.model_copy(update={"unlearned": str(folder)})
    (row,) = audit_checkpoint(given)["rows"]
    (expected,) = first_run[0].result()["rows"]
    assert row["method"] == "given" and row["lr"] is None
    for key in (
        "forget_unlearned",
        "forget_relearned",
        "retain_unlearned",
        "advantage",
        "mean_cka",
        "regime",
    ):
        assert (
            row[key] == pytest.approx(expected[key])
            if isinstance(row[key], float)
            else row[key] == expected[key]
        ), key


def test_cli_json_rows_have_exactly_the_demo_keys(first_run, tmp_path, capsys):
    import json

    from unlearning_audit import cli

    out = tmp_path / "rows.json"
    cli._finish(first_run[0].result(), str(out))
    (row,) = json.loads(out.read_text())
    assert list(row) == list(SUMMARY_KEYS)
    printed = capsys.readouterr().out
    assert row["regime"] in printed and "report:" in printed


def _cli_audit(config: Path, **extra_env: str) -> tuple[str, str, float]:
    """`unlearning-audit audit` in a fresh process with no Prefect server configured (and
    ``extra_env``); its stdout, stderr and wall time."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | extra_env
    command = [str(Path(sys.executable).with_name("unlearning-audit")), "audit"]
    start = time.perf_counter()
    done = subprocess.run(
        [*command, "--original", "embedded", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout, done.stderr, time.perf_counter() - start


def test_a_cli_rerun_is_answered_from_the_audit_index(first_run, audit_params, tmp_path):
    """The CLI indexes an audit it ran; a rerun with every input unchanged prints the same table
    from the stored report without starting Prefect (README: 3-4 s on a 2-core machine, most
    of it importing torch and reading Prefect's settings), nor importing what only computing
    needs (transformers, matplotlib: seconds more)."""
    config = tmp_path / "audit.json"
    config.write_text(audit_params.model_dump_json())
    first, _, cold = _cli_audit(config)  # every stage cached, through a temporary Prefect API
    again, log, warm = _cli_audit(config, PYTHONPROFILEIMPORTTIME="1")  # imports, on stderr
    imported = set(re.findall(r"^import time:.*\| +([\w.]+)$", log, re.MULTILINE))
    assert "torch" in imported and not {"transformers", "matplotlib"} & imported
    print(f"CLI audit with every stage stored: {cold:.1f} s; answered from the index: {warm:.1f} s")
    assert "Prefect not started" not in first and "Prefect not started" in again
    table = first[first.index("run ") :]
    assert table in again  # the same rows, report and HTML report
    assert warm < cold / 2


def test_the_audit_identity_follows_every_input(tmp_path, data_files):
    """A checkpoint's byte, a data row, a parameter: each gives another identity."""
    tok = archs.tokenizer(["Who wrote Q0?", "Who wrote R?", "A", "B"])
    folder = archs.save(archs.model("llama", tok), tok, tmp_path / "ckpt")
    params = AuditParams(
        original=str(folder),
        data=DataConfig(forget=data_files["forget"], retain=data_files["retain"]),
        methods=[UnlearnConfig(method="GA", lr=1e-5, steps=1)],
        store=str(tmp_path / "store"),
    )
    base = audit_index.identity(params)
    assert audit_index.identity(params) == base
    assert audit_index.identity(params.model_copy(update={"store": "elsewhere"})) == base
    assert audit_index.identity(params.model_copy(update={"seed": 1})) != base
    weights = folder / "model.safetensors"
    content = bytearray(weights.read_bytes())
    content[-1] ^= 1
    weights.write_bytes(bytes(content))
    changed_weights = audit_index.identity(params)
    assert changed_weights["checkpoints"] != base["checkpoints"]
    rows = json.loads(Path(data_files["retain"]).read_text())
    edited = tmp_path / "retain.json"
    edited.write_text(json.dumps([{**rows[0], "answer": "C"}]))
    other_data = params.model_copy(
        update={"data": params.data.model_copy(update={"retain": str(edited)})}
    )
    assert audit_index.identity(other_data)["data"] != changed_weights["data"]
