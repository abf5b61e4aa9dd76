"""The deployed system against a real `prefect server start`, pools, deployments and workers.

One stack serves the module (`unlearning-audit server`'s LocalStack: SQLite in a temp
PREFECT_HOME, a free port on 127.0.0.1, process workers for the `gpu` and `cpu` pools). A local
run of the tiny audit fills the store first, so that each deployed audit below, started through
the API with a new relearning rate (and the clean one a new unlearning rate), runs only the
stages that depend on it: those of the one unlearned model (unlearn, evaluate, relearn, which
also measures the relearned model's activations, extract, the quantized evaluations, splice,
metrics, verdict), in the one flow run on the gpu pool of the audit's stage group of models
(whose other stages it serves from the store); the report in the audit on the cpu pool:

- a clean audit completes, with its verdict in the store and its artifacts in Prefect, and
  hands its GPU stages to the gpu pool in one flow run;
- an audit whose relearn stage fails on both tries fails; retried as the UI retries it, it
  resumes at relearn (every finished stage served from the store), which, failing once more,
  is retried, where an out-of-memory error rebuilds with its batch in two micro-batches, and
  completes.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import socket
import sys
import time
import urllib.request
from uuid import UUID

import pytest
from matplotlib import image
from prefect import Task, get_client
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.events.worker import EventsWorker
from prefect.flows import load_flow_from_entrypoint
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import State
from test_report import MIN_STD, _screenshot_module

from flows.audit import audit_checkpoint, audit_models
from flows.dispatch import resolve
from tasks._stage import POOLS, StageRunFailed, _import_name, from_json, gpu_options, to_json
from tasks.evaluate import evaluate
from tasks.verdict import VERDICT
from unlearning_audit import automations
from unlearning_audit import report as report_mod
from unlearning_audit.config import (
    AuditParams,
    DataConfig,
    RelearnConfig,
    Thresholds,
    UnlearnConfig,
)
from unlearning_audit.server import LocalStack
from unlearning_audit.store import ArtifactRef, Store
from unlearning_audit.verdict import REGIMES

pytestmark = pytest.mark.slow
STORE_STAGES = {
    *("prepare-data", "fetch-checkpoint", "unlearn", "relearn", "evaluate", "extract"),
    *("splice", "metrics", "verdict", "report"),
}
RELEARN_STAGES = {"relearn"}  # the GPU stages a new relearning rate reruns
GPU_STAGES = {"fetch-checkpoint", "unlearn", "relearn", "evaluate", "extract", "fisher", "splice"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """The fault file the workers read (UNLEARNING_AUDIT_FAULTS); empty: no faults."""
    path = tmp_path_factory.mktemp("faults") / "faults.json"
    path.write_text("{}")
    return path


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    """The store of the module's audits, whose reports the stack serves."""
    return str(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, faults, store_url):
    """Server, `gpu` and `cpu` pools, the deployments of deployments/prefect.yaml, workers, and
    the read-only report server of the module's store."""
    env = {
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "UNLEARNING_AUDIT_DISPATCH_POLL": "0.5",
        "UNLEARNING_AUDIT_GPU_RETRIES": "1",
        "UNLEARNING_AUDIT_GPU_RETRY_DELAY": "0",
        "UNLEARNING_AUDIT_FAULTS": str(faults),
    }
    home = tmp_path_factory.mktemp("prefect-home")
    with (
        LocalStack(port=_free_port(), gpus=0, home=home, env=env, store=store_url) as running,
        temporary_settings({PREFECT_API_URL: running.api_url}),
    ):
        yield running
        # send this process's pending logs and events while the server is up: left queued,
        # they would be retried against a stopped server at the end of the session
        APILogWorker.drain_all(timeout=30)
        EventsWorker.drain_all(timeout=30)
        started = list(running.processes.values())
    assert len(started) == 3 and all(proc.poll() is not None for proc in started)


@pytest.fixture(scope="module")
def base(tiny, store_url) -> AuditParams:
    """The tiny audit: one GA run of 10 steps, relearning on the forget set under one seed; no
    control, Fisher or probes."""
    return AuditParams(
        embedded=tiny,
        store=store_url,
        methods=[UnlearnConfig(method="GA", lr=1e-3, steps=10)],
        relearn=RelearnConfig(sources=["forget"], seeds=1),
        data=DataConfig(eval_max_rows=40),
        no_control=True,
        fisher=False,
        probes=False,
    )


def _task_runs(flow_run_id: UUID) -> list:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def _stage_runs(flow_run_id: UUID) -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
            )
        )


def _wait_final(flow_run_id: UUID, timeout: float = 400) -> object:
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state.is_final():
                return run
            time.sleep(1)
    raise TimeoutError(f"flow run {flow_run_id} not final after {timeout}s")


@pytest.fixture(scope="module")
def warm(stack, base) -> None:
    """The tiny audit run locally (no dispatch), against the stack's API: fills the store."""
    assert audit_checkpoint(base, return_state=True).is_completed()


def _relearning_at(base: AuditParams, lr: float) -> AuditParams:
    return base.model_copy(update={"relearn": base.relearn.model_copy(update={"lr": lr})})


def _group_name(params: AuditParams) -> str:
    """The name of the flow run of the audit's stage group of models (flows/audit.py)."""
    return f"models of {params.original}"


def _deployed_audit(params: AuditParams):
    return run_deployment(
        "audit-checkpoint/audit",
        parameters={"params": params.model_dump(mode="json")},
        timeout=600,
        poll_interval=1,
    )


@pytest.fixture(scope="module")
def clean(warm, base) -> dict:
    """A deployed audit with no fault, unlearning and relearning at new rates: every stage of
    its unlearned model runs (the original's and the data's are served from the store)."""
    unlearning = [base.methods[0].model_copy(update={"lr": 2e-3})]
    params = _relearning_at(base, 2e-3).model_copy(update={"methods": unlearning})
    start = time.perf_counter()
    run = _deployed_audit(params)
    print(f"clean deployed audit: {time.perf_counter() - start:.0f}s")
    return {
        "params": params,
        "run": run,
        "tasks": _task_runs(run.id),
        "stages": _stage_runs(run.id),
    }


@pytest.fixture(scope="module")
def failed(warm, base, faults) -> dict:
    """A deployed audit whose relearn stage fails on its try and on its retry."""
    params = _relearning_at(base, 3e-3)
    faults.write_text(json.dumps({"relearn": ["error", "error"]}))
    start = time.perf_counter()
    run = _deployed_audit(params)
    print(f"failing deployed audit: {time.perf_counter() - start:.0f}s")
    return {
        "params": params,
        "run": run,
        "tasks": _task_runs(run.id),
        "stages": _stage_runs(run.id),
    }


@pytest.fixture(scope="module")
def retried(failed, faults) -> dict:
    """The failed audit retried as the UI's Retry button does it: an AwaitingRetry state."""
    faults.write_text(json.dumps({"relearn": ["error", "oom"]}))
    start = time.perf_counter()
    with get_client(sync_client=True) as client:
        answer = client.set_flow_run_state(
            failed["run"].id,
            State(type=StateType.SCHEDULED, name="AwaitingRetry", message="Retry from the UI"),
        )
    run = _wait_final(failed["run"].id)
    print(f"retried deployed audit: {time.perf_counter() - start:.0f}s")
    before = {s.id for s in failed["stages"]}
    return {
        "answer": answer.status.value,
        "run": run,
        "tasks": [t for t in _task_runs(run.id) if t.flow_run_run_count == run.run_count],
        "stages": [s for s in _stage_runs(run.id) if s.id not in before],
    }


def _stage(task_run) -> str:
    return task_run.name.rsplit("-", 1)[0]


def _in_order(task_runs: list) -> list:
    """The stage task runs of one attempt, in the order the flow called them."""
    return sorted((t for t in task_runs if _stage(t) in STORE_STAGES), key=lambda t: t.created)


def test_pools_deployments_and_run_form(stack):
    with get_client(sync_client=True) as client:
        pools = {p.name: p for p in client.read_work_pools()}
        deployments = {d.name: d for d in client.read_deployments()}
    assert pools["gpu"].type == pools["cpu"].type == "process"
    assert pools["gpu"].concurrency_limit == 1  # no GPU here: one GPU stage at a time
    assert set(deployments) == {"audit", "study", "watch", "gpu-stage", "cpu-stage"}
    assert deployments["gpu-stage"].work_pool_name == "gpu"
    assert deployments["audit"].work_pool_name == deployments["cpu-stage"].work_pool_name == "cpu"
    assert deployments["audit"].job_variables["env"]["UNLEARNING_AUDIT_DISPATCH"] == "deployed"
    assert deployments["watch"].schedules[0].schedule.cron == "*/30 * * * *"
    schema = deployments["audit"].parameter_openapi_schema
    default = schema["properties"]["params"]["default"]
    assert AuditParams.model_validate(default) == AuditParams()  # the form's working default
    assert default["methods"]  # a default_factory field gets its value in the form too
    fields = schema["definitions"]["AuditParams"]["properties"]
    assert fields["original"]["default"] == "embedded" and fields["original"]["description"]
    undescribed = [
        f"{name}.{field}"
        for name, definition in schema["definitions"].items()
        for field, spec in definition.get("properties", {}).items()
        if not spec.get("description")
    ]
    assert undescribed == []  # every field of the run form says what it is
    method = schema["definitions"]["UnlearnConfig"]["properties"]["method"]
    assert method["enum"] == ["GA", "GA+GD", "GA+KL", "NPO", "NPO+KL", "RLabel"]  # a choice
    assert fields["device"]["examples"][0] == "auto" and fields["device"]["pattern"]
    # the server checks a run's parameters against the form's schema: an unknown method or
    # device is refused when the run is created, not on a worker
    for bad in ({"methods": [{"method": "GAX"}]}, {"device": "tpu"}):
        with pytest.raises(Exception, match=r"(?i)validation"):
            run_deployment("audit-checkpoint/audit", parameters={"params": bad}, timeout=0)


def test_deployed_audit_completes_with_verdict_and_artifacts(clean):
    run = clean["run"]
    assert run.state.type == StateType.COMPLETED, run.state.message
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    by_key = {a.key: a for a in artifacts}
    assert {"audit-verdict", "audit-report"} <= set(by_key)
    (row,) = json.loads(by_key["audit-verdict"].data)
    assert row["regime"] in REGIMES
    store = Store(clean["params"].store)
    report_key = re.search(r"(report/[0-9a-f]+)", by_key["audit-verdict"].description).group(1)
    report = store.manifest(report_key)
    assert report is not None  # the report this run published is in the store ...
    # ... with the references of what it was made from: follow the verdict's key (two audits
    # can store identical verdicts under different keys, so a content hash names no one run)
    inputs = store.read_json(ArtifactRef(key=report_key, hash=report["hash"]), report_mod.INPUTS)
    (run_refs,) = inputs["references"]["runs"]  # the one GA run
    verdict_ref = ArtifactRef.model_validate(run_refs["verdict"])
    verdict_manifest = store.manifest(verdict_ref.key)
    assert verdict_manifest is not None and verdict_manifest["hash"] == verdict_ref.hash
    # the verdict of this audit's relearning run (lr 2e-3), not of the store-filling local run
    (relearn_ref,) = [ArtifactRef.model_validate(r) for r in run_refs["relearned"]["forget"]]
    assert verdict_manifest["meta"]["inputs"]["relearned"] == {"forget": [relearn_ref.hash]}
    relearn = store.manifest(relearn_ref.key)
    assert relearn["meta"]["config"]["relearn"]["lr"] == clean["params"].relearn.lr
    verdict = store.read_json(verdict_ref, VERDICT)
    assert inputs["runs"][0]["verdict"] == verdict  # the verdict the report was rendered from
    assert row["regime"] == verdict["regime"]


def test_the_report_link_opens_over_http(clean, stack, tmp_path):
    """The audit's HTML report link is the stack's report server (not a file:// URI a browser
    refuses): fetched, it is the stored report; rendered in headless Chromium, it paints."""
    with get_client(sync_client=True) as client:
        (link,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[clean["run"].id]),
                key=ArtifactFilterKey(any_=["audit-html"]),
            )
        )
    (url,) = re.findall(r"\((http://[^)]+)\)", link.data)  # a Markdown link
    assert url.startswith(f"{stack.reports_url}/report/"), url
    with urllib.request.urlopen(url, timeout=30) as answer:
        served = answer.read()
    key = url[len(stack.reports_url) + 1 :].rsplit("/", 1)[0]
    store = Store(clean["params"].store)
    ref = ArtifactRef(key=key, hash=store.manifest(key)["hash"])
    assert served == store.read_bytes(ref, report_mod.REPORT_HTML)
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    shot = tmp_path / "report.png"
    _screenshot_module().render_png(url, shot, 1000, 1400)
    assert image.imread(shot)[..., :3].std() > MIN_STD


def test_gpu_stages_ran_as_one_flow_run_on_the_gpu_pool(clean):
    """The unlearned model's GPU stages (unlearn, evaluate, relearn, extract, two quantized
    evaluations, splice) reach the gpu pool as one flow run of the audit's group of models,
    which also computes the model's metrics and verdict and serves the stored stages of the
    others; the audit serves each of them from the store afterwards."""
    assert clean["run"].work_pool_name == "cpu"
    (group,) = clean["stages"]  # far fewer flow runs on the gpu pool than stages computed
    assert group.name == _group_name(clean["params"]) and group.work_pool_name == "gpu"
    assert group.state.type == StateType.COMPLETED, group.state.message
    ran = [_stage(t) for t in _in_order(clean["tasks"]) if t.state.name != "Cached"]
    assert ran == [
        *("unlearn", "evaluate", "relearn", "extract", "evaluate", "evaluate", "splice"),
        *("metrics", "metrics", "verdict", "report"),
    ]
    assert len([stage for stage in ran if stage in GPU_STAGES]) == 7
    there = [t for t in _in_order(_task_runs(group.id)) if t.state.name != "Cached"]
    assert [_stage(t) for t in there] == ran[:-1]  # all but the report


def test_failed_stage_fails_the_run_after_its_retries(failed):
    assert failed["run"].state.type == StateType.FAILED
    (stage_run,) = failed["stages"]
    assert stage_run.name == _group_name(failed["params"])
    assert stage_run.state.type == StateType.FAILED
    (inner,) = [t for t in _task_runs(stage_run.id) if _stage(t) == "relearn"]
    assert inner.run_count == 2  # the try and its one retry (UNLEARNING_AUDIT_GPU_RETRIES=1)
    (outer,) = [t for t in failed["tasks"] if _stage(t) == "relearn"]
    assert outer.state.type == StateType.FAILED and outer.run_count == 1  # not retried again


def test_retry_resumes_at_the_failed_stage(failed, retried):
    assert retried["answer"] == "ACCEPT"
    assert retried["run"].state.type == StateType.COMPLETED, retried["run"].state.message
    assert retried["run"].run_count == 2
    # the flow calls its stages in the same order each time: attempt 2 replays attempt 1
    before, after = _in_order(failed["tasks"]), _in_order(retried["tasks"])
    assert [_stage(t) for t in after[: len(before)]] == [_stage(t) for t in before]
    assert before[-1].state.type == StateType.FAILED and _stage(before[-1]) == "relearn"
    assert {t.state.name for t in after[: len(before) - 1]} == {"Cached"}
    assert after[len(before) - 1].state.name == "Completed"  # relearn: computed this time
    computed = {_stage(t) for t in after if t.state.name != "Cached"}
    assert computed == RELEARN_STAGES | {"metrics", "verdict", "report"}
    assert {s.name for s in retried["stages"]} == {_group_name(failed["params"])}


def test_out_of_memory_rebuilds_with_twice_the_micro_batches(failed, retried):
    store = Store(failed["params"].store)
    (manifest,) = [
        m for m in store.manifests("relearn") if m["meta"]["config"]["relearn"]["lr"] == 3e-3
    ]
    assert manifest["meta"]["oom_micro_batches"] == 2
    assert manifest["meta"]["config"]["relearn"]["micro_batches"] == 1  # the requested key


def test_stage_failing_once_is_retried_and_the_run_completes(retried):
    (group,) = retried["stages"]
    (inner,) = [t for t in _task_runs(group.id) if _stage(t) == "relearn"]
    assert inner.run_count == 2 and inner.state.type == StateType.COMPLETED
    assert retried["run"].state.type == StateType.COMPLETED


def test_gpu_retries_back_off_exponentially(monkeypatch):
    monkeypatch.setenv("UNLEARNING_AUDIT_GPU_RETRIES", "3")
    monkeypatch.setenv("UNLEARNING_AUDIT_GPU_RETRY_DELAY", "5")
    options = gpu_options()
    assert options["retries"] == 3 and options["retry_delay_seconds"] == [5, 10, 20]
    retry = options["retry_condition_fn"]
    assert retry(None, None, State(type=StateType.FAILED, data=RuntimeError("CUDA error")))
    failed = StageRunFailed("stage run failed after its retries", crashed=False)
    crashed = StageRunFailed("stage run's process died", crashed=True)
    assert not retry(None, None, State(type=StateType.FAILED, data=failed))
    assert retry(None, None, State(type=StateType.FAILED, data=crashed))
    bad_input = ValueError("checkpoint ...: config.json is not valid JSON")
    assert not retry(None, None, State(type=StateType.FAILED, data=bad_input))


def test_every_stage_task_names_its_pool_and_carries_no_tag():
    """The GPU stages go to the gpu pool, the others stay; no stage task has a tag, so Prefect
    asks its API for no tag concurrency slots at each stage run (tasks._stage.stage_task)."""
    import flows.audit  # noqa: F401  (imports every stage module)

    assert {name for name, pool in POOLS.items() if pool == "gpu"} == GPU_STAGES
    assert set(POOLS.values()) == {"gpu", "cpu"}
    for module in {sys.modules[name] for name in sys.modules if name.startswith("tasks.")}:
        for task in (obj for obj in vars(module).values() if isinstance(obj, Task)):
            assert task.name in POOLS and not task.tags, task.name


def test_stage_flow_runs_only_stage_tasks_and_groups():
    assert resolve("tasks.evaluate:evaluate").name == "evaluate"
    assert resolve("flows.audit:audit_models").__name__ == "audit_models"
    # named by their files, as a worker imports them (a deployed flow's module is not `flows.`)
    assert _import_name(evaluate.fn) == "tasks.evaluate:evaluate"
    loaded = inspect.getmodule(load_flow_from_entrypoint("flows/audit.py:audit_checkpoint").fn)
    assert loaded.__name__ != "flows.audit"
    assert resolve(_import_name(inspect.unwrap(loaded.audit_models))) is audit_models
    for name in (
        *("os:system", "tasks._stage:write_json", "tasks.evaluate", "flows.audit:_fetch"),
        "flows.audit:audit_run",  # a function of the group, not a group of its own
        *("flows.audit:audit_checkpoint", "flows.audit:json"),
    ):
        with pytest.raises(ValueError):
            resolve(name)


def test_arguments_travel_as_json_and_come_back_as_themselves():
    """A group's arguments (dicts of references, configs in a candidate, a stage's Cached
    state) pass through JSON to the pool and come back equal, with their types."""
    ref = ArtifactRef(key="evaluate/abc", hash="h1")
    arguments = {
        "params": AuditParams(thresholds=Thresholds(metric="probability")),
        "original": {"checkpoint": ref, "eval": State(type=StateType.COMPLETED, data=ref)},
        "candidate": {"label": "GA", "lr": 1e-3, "config": UnlearnConfig(method="NPO")},
        "runs": {"forget": [ref, ref]},
        "rows": 3,
        "none": None,
    }
    back = from_json(json.loads(json.dumps(to_json(arguments))))
    assert back == {**arguments, "original": {"checkpoint": ref, "eval": ref}}
    assert isinstance(back["candidate"]["config"], UnlearnConfig)
    assert back["params"].thresholds.metric == "probability"
    with pytest.raises(ValueError, match="not a model of this package"):
        from_json({"__model__": "subprocess:Popen", "fields": {}})


def test_a_restart_keeps_deployments_set_through_the_api(stack):
    """What the docs tell a team to do in the UI (set the watch's source, switch its schedule
    on) survives a restart's deploy step; a deployment deleted is registered again, alone."""
    with get_client(sync_client=True) as client:
        watch = client.read_deployment_by_name("watch/watch")
        client.update_deployment(watch.id, DeploymentUpdate(parameters={"source": "s3://b/ckpts"}))
        (schedule,) = watch.schedules
        client.update_deployment_schedule(watch.id, schedule.id, active=True)
        assert stack.deploy() == []  # what `unlearning-audit server` runs at each start
        kept = client.read_deployment_by_name("watch/watch")
        assert kept.parameters == {"source": "s3://b/ckpts"}
        assert [s.active for s in kept.schedules] == [True]
        client.delete_deployment(watch.id)
        assert stack.deploy() == ["watch"]
        again = client.read_deployment_by_name("watch/watch")
        assert again.parameters == {"source": "checkpoints"}  # the file's, as on a first start
        assert [s.active for s in again.schedules] == [False]


def test_the_shipped_automations_exist(stack):
    with get_client(sync_client=True) as client:
        for name in (automations.ZOMBIE, automations.FAILED):
            assert client.read_automations_by_name(name), name
        audit = client.read_deployment_by_name("audit-checkpoint/audit")
    limit = audit.global_concurrency_limit  # what the deployment's concurrency limit makes
    assert limit is not None and limit.limit == 1  # the gpu pool's, on a machine without GPUs


def test_a_failed_audit_is_notified(failed, stack):
    """The failed audit's notification reaches the stack's listener (no --notify-url)."""
    log = stack.logs / "notifications.log"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if log.exists() and failed["run"].name in log.read_text():
            break
        time.sleep(1)
    text = log.read_text() if log.exists() else ""
    assert f"audit {failed['run'].name} ended Failed" in text, text


def test_a_stack_stopped_mid_stage_restarts_with_no_run_left_running(stack, clean, base):
    """Stopped while a GPU stage runs, the stack marks the audit and its stage Crashed (so the
    UI offers Retry and the pool slot frees); restarted, nothing is left Running or Pending and
    a new audit runs at once."""
    interrupted = run_deployment(
        "audit-checkpoint/audit",
        parameters={"params": _relearning_at(base, 4e-3).model_dump(mode="json")},
        timeout=0,
    )
    deadline = time.monotonic() + 300
    while not any(s.state.is_running() for s in _stage_runs(interrupted.id)):
        assert time.monotonic() < deadline, "no stage started running"
        time.sleep(0.5)
    stack.stop()
    stack.start()
    live = FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING])
    with get_client(sync_client=True) as client:
        left = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=live))
        )
        assert left == [], [(r.name, r.state.name) for r in left]
        assert client.read_flow_run(interrupted.id).state.is_crashed()
    assert any(s.state.is_crashed() for s in _stage_runs(interrupted.id))
    start = time.perf_counter()
    again = _deployed_audit(clean["params"])  # every stage stored: starts and ends at once
    assert again.state.is_completed(), again.state.message
    assert time.perf_counter() - start < 120
