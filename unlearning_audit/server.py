"""A local Prefect stack: server, work pools, deployments and process workers.

`unlearning-audit server` runs it until Ctrl-C; the deployment tests start the same stack. The
server, the deployer and the workers are `prefect` commands run as child processes, each in its
own process group so that stopping the stack also stops the flow runs its workers started; the
pools are made with Prefect's client, imported inside the function that needs it, so importing
this module never imports Prefect.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path

from . import automations, report_links
from .runtime import PREFECT_ENV
from .store import Store

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
POOLS = ("gpu", "cpu")
# Defaults that the caller's environment may override: no telemetry, and workers and waiting
# audits that notice a new stage run within a second or two (the API is local).
DEFAULT_ENV = {
    **PREFECT_ENV,
    "PREFECT_WORKER_QUERY_SECONDS": "2",
    "UNLEARNING_AUDIT_DISPATCH_POLL": "1",
    # flow runs send heartbeats, so the silent-run automation can mark dead ones Crashed
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(automations.HEARTBEAT_SECONDS),
}


def _prefect() -> str:
    """The `prefect` command of this interpreter's environment."""
    return str(Path(sys.executable).with_name("prefect"))


@dataclass
class LocalStack:
    """A Prefect server on ``host:port`` with the `gpu` and `cpu` pools, deployments, workers.

    GPU workers, each pinned to ``gpus_per_worker`` of the ``gpus`` GPUs with
    CUDA_VISIBLE_DEVICES and taking one run at a time, serve the `gpu` pool, whose concurrency
    limit is the number of workers (gpu_workers); with no GPU, one worker runs the GPU stages
    on the CPU; ``gpus`` defaults to the GPUs torch sees. A stage that shards across several
    GPUs (an audit's ``gpus``) needs a worker with as many: ``gpus_per_worker``. ``env`` is
    added to every process's environment; ``home`` is PREFECT_HOME (the SQLite database, results
    and logs), default Prefect's own. The reports of ``store`` (default: the default store) are
    served read-only over HTTP on ``host:reports_port`` (0: a free port), and the workers link
    report artifacts there (report_links). A failed audit is notified to
    ``notify_url``, else on this process's console (automations). At most ``audit_limit``
    audits run at once (default: the gpu pool's limit), set when the `audit` deployment is
    registered.
    """

    port: int = 4200
    host: str = "127.0.0.1"
    gpus: int | None = None
    gpus_per_worker: int = 1
    home: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    store: str | None = None
    reports_port: int = 0
    notify_url: str | None = None
    audit_limit: int | None = None
    logs: Path = field(init=False)
    pins: list[dict[str, str]] = field(init=False)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict, init=False)
    reports: ThreadingHTTPServer | None = field(default=None, init=False)
    listener: ThreadingHTTPServer | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.gpus is None:
            import torch

            self.gpus = torch.cuda.device_count()
        self.pins = gpu_workers(self.gpus, self.gpus_per_worker)
        home = self.home or Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
        self.logs = home / "unlearning-audit-logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    @property
    def api_url(self) -> str:
        """The server's API URL, what PREFECT_API_URL must name."""
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        """The Prefect UI."""
        return f"http://{self.host}:{self.port}"

    def environ(self, **extra: str) -> dict[str, str]:
        """The environment of every process of the stack."""
        home = {"PREFECT_HOME": str(self.home)} if self.home else {}
        api = {"PREFECT_API_URL": self.api_url}
        return {**DEFAULT_ENV, **os.environ, **home, **api, **self.env, **extra}

    def __enter__(self) -> LocalStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 180) -> None:
        """Server, report server, pools, workers, then the missing deployments; a failed step
        raises."""
        self._spawn("server", "server", "start", "--host", self.host, "--port", str(self.port))
        self.wait_healthy(timeout)
        self.crash_orphans()  # runs left by a stack that was killed outright
        self.serve_reports()
        self.create_pools()
        self.create_automations()
        self.start_workers()  # they start while the deployments register
        if "audit" in self.deploy():
            self.limit_audits()

    @property
    def reports_url(self) -> str | None:
        """Where the reports are served, once started."""
        return f"http://{self.host}:{self.reports.server_port}" if self.reports else None

    def serve_reports(self) -> None:
        """Serve the store's reports and tell every process of the stack started from now on
        where."""
        store = Store(self.store)
        self.reports = report_links.serve(store.url, self.host, self.reports_port)
        self.env = {
            **self.env,
            report_links.URL_ENV: self.reports_url,
            report_links.STORE_ENV: store.url,
        }

    def _spawn(self, name: str, *args: str, **env: str) -> None:
        with open(self.logs / f"{name}.log", "wb") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                [_prefect(), *args],
                cwd=REPO,
                env=self.environ(**env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes[name] = proc

    def log_tail(self, name: str, chars: int = 4000) -> str:
        """The end of a process's log, for error messages."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def wait_healthy(self, timeout: float) -> None:
        """Block until the API answers its health check; raise if the server exits or hangs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes["server"].poll() is not None:
                raise RuntimeError(f"prefect server exited:\n{self.log_tail('server')}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"prefect server not healthy after {timeout:.0f}s")

    def create_pools(self) -> None:
        """The `gpu` and `cpu` process pools; `gpu` limited to one run per GPU worker."""
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
        from prefect.exceptions import ObjectAlreadyExists
        from prefect.workers.process import ProcessWorker

        template = ProcessWorker.get_default_base_job_template()
        limits = {"gpu": len(self.pins), "cpu": None}
        with SyncPrefectClient(self.api_url) as client:
            for name in POOLS:
                try:
                    client.create_work_pool(
                        WorkPoolCreate(
                            name=name,
                            type="process",
                            base_job_template=template,
                            concurrency_limit=limits[name],
                        )
                    )
                except ObjectAlreadyExists:
                    client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=limits[name]))

    def deploy(self) -> list[str]:
        """Register the deployments of deployments/prefect.yaml that the server lacks (from the
        repository root); return their names. A deployment the server has keeps everything set
        through the UI or the API (parameters, schedules and whether they are active, ...): a
        restart never undoes it. To reset one to the file, delete it and restart, or run
        `prefect deploy` by hand."""
        missing = [name for name in declared_deployments() if name not in self.deployments()]
        if not missing:
            return []
        names = [arg for name in missing for arg in ("--name", name)]
        command = [
            _prefect(),
            "--no-prompt",
            "deploy",
            *names,
            "--prefect-file",
            str(PREFECT_YAML),
        ]
        done = subprocess.run(
            command, cwd=REPO, env=self.environ(), capture_output=True, text=True, check=False
        )
        (self.logs / "deploy.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"prefect deploy failed:\n{(done.stdout + done.stderr)[-4000:]}")
        return missing

    def deployments(self) -> set[str]:
        """The names of the deployments the server has."""
        from prefect.client.orchestration import SyncPrefectClient

        with SyncPrefectClient(self.api_url) as client:
            return {deployment.name for deployment in client.read_deployments()}

    def start_workers(self) -> None:
        """One `cpu` worker, and the `gpu` workers (gpu_workers; one on a machine without
        GPUs)."""
        self._spawn("worker-cpu", "worker", "start", "--pool", "cpu", "--name", "cpu")
        for index, pin in enumerate(self.pins):
            name = f"gpu-{index}"
            self._spawn(
                f"worker-{name}",
                *("worker", "start", "--pool", "gpu", "--name", name, "--limit", "1"),
                **pin,
            )

    def running(self) -> bool:
        """Whether every process of the stack is still alive."""
        return all(proc.poll() is None for proc in self.processes.values())

    def stop(self, grace: float = 15) -> None:
        """Stop the workers together (their flow runs with them), mark the runs they left
        Crashed, then stop the server (see ``terminate``) and the report and notification
        servers."""
        workers = [proc for name, proc in self.processes.items() if name != "server"]
        terminate(workers, grace)
        server = self.processes.get("server")
        if server is not None and server.poll() is None:
            self.crash_orphans()
        terminate([proc for name, proc in self.processes.items() if name == "server"], grace)
        self.processes.clear()
        for http in (self.reports, self.listener):
            if http is not None:
                http.shutdown()
                http.server_close()
        self.reports = self.listener = None

    def crash_orphans(self) -> list[str]:
        """Mark Crashed every flow run the server holds as Pending, Running or Cancelling: with
        the stack's workers stopped (or never started since a restart), no process runs them.
        Crashed frees their pool and deployment slots, and the UI offers Retry, which resumes
        at the first stage not stored. Returns their names."""
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.states import Crashed

        live = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
        state = FlowRunFilterState(type=FlowRunFilterStateType(any_=live))
        message = "the stack stopped while this run was in flight; retry it to resume"
        with SyncPrefectClient(self.api_url) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=state))
            for run in runs:
                client.set_flow_run_state(run.id, Crashed(message=message))
        return [run.name for run in runs]

    def create_automations(self) -> None:
        """The shipped automations (automations.py); notifications go to ``notify_url``, else
        to a listener printing them here and logging them to ``notifications.log``."""
        target = self.notify_url
        if target is None:
            self.listener = automations.listen(self.logs / "notifications.log", self.host)
            target = f"http://{self.host}:{self.listener.server_port}/"
        automations.ensure(self.api_url, target)

    def limit_audits(self) -> None:
        """At most ``audit_limit`` audit runs at once (default: the gpu pool's limit); set on
        the `audit` deployment when it is registered, a value changed in the UI kept after."""
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.actions import DeploymentUpdate

        limit = self.audit_limit or len(self.pins)
        with SyncPrefectClient(self.api_url) as client:
            audit = client.read_deployment_by_name("audit-checkpoint/audit")
            client.update_deployment(audit.id, DeploymentUpdate(concurrency_limit=limit))


def gpu_workers(gpus: int, per_worker: int = 1) -> list[dict[str, str]]:
    """The environment pin of each `gpu` worker: ``gpus`` GPUs in groups of ``per_worker``
    (CUDA_VISIBLE_DEVICES "0,1", "2,3", ...); one unpinned worker without GPUs. Refuses a
    group size that does not divide the GPUs, before anything starts."""
    if per_worker < 1:
        raise ValueError(f"--gpus-per-worker must be at least 1, got {per_worker}")
    if not gpus:
        return [{}]
    if gpus % per_worker:
        raise ValueError(
            f"--gpus-per-worker {per_worker} does not divide the {gpus} GPUs into whole workers"
        )
    return [
        {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in range(w, w + per_worker))}
        for w in range(0, gpus, per_worker)
    ]


def declared_deployments() -> list[str]:
    """The deployment names deployments/prefect.yaml declares."""
    import yaml

    return [d["name"] for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]]


def terminate(procs: list[subprocess.Popen], grace: float) -> None:
    """Stop child processes, each the leader of its own process group: SIGINT (Prefect's
    graceful stop), then, for those still running after ``grace`` seconds, SIGTERM to the group
    (a second signal makes a Prefect worker kill itself), then SIGKILL; and the group's leftovers
    (a flow run the worker started) are killed."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        alive = [proc for proc in procs if proc.poll() is None]
        if not alive:
            break
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                if sig == signal.SIGINT:
                    proc.send_signal(sig)
                else:
                    os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait
        for proc in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(stack: LocalStack) -> None:
    """Run ``stack`` in the foreground until Ctrl-C (or SIGTERM), or until a process of it dies."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: it may have been ignored
        signal.signal(sig, _interrupt)
    try:
        with stack:
            print(f"Prefect UI: {stack.ui_url}  (API {stack.api_url}; logs in {stack.logs})")
            if stack.reports_url:
                print(f"reports of {stack.store or 'the default store'}: {stack.reports_url}")
            print("work pools: gpu, cpu; deployments from deployments/prefect.yaml. Ctrl-C stops.")
            while stack.running():
                time.sleep(1)
    except KeyboardInterrupt:
        print("stopped")
        return
    raise SystemExit(f"a process of the stack exited; see its log in {stack.logs}")
