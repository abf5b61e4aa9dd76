"""Hand-over overhead of a deployed audit: the time its GPU work spends getting to the gpu pool.

    python bench/bench_handover.py [--params '{"methods": [...]}'] [--label TEXT]

Starts `unlearning-audit server`'s stack (LocalStack: a real `prefect server start` on a free
port, SQLite in a temporary PREFECT_HOME, process workers, no GPU: one `gpu` worker), runs one
deployed audit (default: `AuditParams()`, the embedded audit `unlearning-audit demo` runs; JSON
``--params`` override fields) into an empty temporary store, and reads from the Prefect API:

- each flow run the audit started on a pool (a stage, or a group of stages: today one, every
  model stage of the audit): its wall time, from its creation (the audit's request), or later
  the end of the run that held the pool's one slot before it, to its end; its compute, the time
  during which at least one task run inside it computed (not served from the store); and where
  the rest went (_breakdown);
- hand-over: the sum over those runs of wall time minus compute (queueing, the worker starting
  a process, imports, the flow engine, results), and its share of the audit's wall time;
- outside compute: the audit's wall time minus every stage's compute, wherever it ran (also
  counts what hand-over misses: the audit's polling, stages served from the store).

Run it with the code to compare on PYTHONPATH (the stack deploys the flows of the repository
that holds the `unlearning_audit` imported here): e.g. PYTHONPATH=/path/to/main for "before".
Prints a Markdown table row and the per-run numbers. Numbers vary run to run (a shared machine);
the share varies less. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import time
from pathlib import Path

from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
)
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

import unlearning_audit
from unlearning_audit.config import AuditParams
from unlearning_audit.server import LocalStack


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seconds(start, end) -> float:
    return (end - start).total_seconds() if start and end else 0.0


def _task_runs(client, flow_run_id) -> list:
    return client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    )


def _computing(task_runs, waits=()) -> list[tuple]:
    """The (start, end) of these task runs that computed: every one not served from the store
    (nor computed by a pool's flow run), and not overlapping one of the ``waits`` intervals (a
    pool's flow run: the audit's task that waits for it, and the task run Prefect adds for it
    as a subflow)."""
    return [
        (t.start_time, t.end_time)
        for t in task_runs
        if t.state.name != "Cached"
        and "by flow run" not in (t.state.message or "")  # served after its group's run
        and t.start_time
        and not any(t.start_time < end and start < t.end_time for start, end in waits)
    ]


def _covered(intervals: list[tuple]) -> float:
    """Seconds during which at least one of ``intervals`` ran: stages that ran side by side
    (the control's fetch beside the original's) count once."""
    total, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total, reach = total + _seconds(start, end), end
        elif end > reach:
            total, reach = total + _seconds(reach, end), end
    return total


def _breakdown(run, task_runs) -> dict:
    """Where a pool run's hand-over goes: ``pickup``, from its creation to its start (the
    worker noticing it, starting a process, loading the flow); ``lead``, from its start to its
    first task run's (imports of the stage modules, the flow engine); ``gaps``, the time
    between its task runs when none ran (Prefect's bookkeeping of each, served stages); and
    ``tail``, from its last task run's end to its own (results, the process ending)."""
    spans = sorted((t.start_time, t.end_time) for t in task_runs if t.start_time and t.end_time)
    if not spans:
        return {}
    first, last = spans[0][0], max(end for _, end in spans)
    busy = _covered(spans)
    return {
        "pickup": _seconds(run.created, run.start_time),
        "lead": _seconds(run.start_time, first),
        "gaps": _seconds(first, last) - busy,
        "tail": _seconds(last, run.end_time),
        "tasks": len(spans),
    }


def measure(audit_id) -> dict:
    """The hand-over numbers of a finished deployed audit (see the module docstring)."""
    with get_client(sync_client=True) as client:
        audit = client.read_flow_run(audit_id)
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[audit_id])
            )
        )
        runs, computing = [], []
        for run in sorted(children, key=lambda r: r.start_time or r.created):
            before = [
                r.end_time
                for r in children
                if r.work_pool_name == run.work_pool_name
                and r.start_time
                and r.start_time < run.start_time
            ]
            ready = max([run.created, *(end for end in before if end and end > run.created)])
            task_runs = _task_runs(client, run.id)
            inside = _computing(task_runs)
            computing += inside
            runs.append(
                {
                    "name": run.name,
                    "pool": run.work_pool_name,
                    "wall": _seconds(ready, run.end_time),
                    "compute": _covered(inside),
                    **_breakdown(run, task_runs),
                }
            )
        waits = [(r.created, r.end_time) for r in children]
        computing += _computing(_task_runs(client, audit_id), waits)
    wall = _seconds(audit.start_time, audit.end_time)
    handover = sum(r["wall"] - r["compute"] for r in runs)
    compute = _covered(computing)
    return {
        "state": audit.state.name,
        "wall": wall,
        "runs": runs,
        "handover": handover,
        "share": handover / wall,
        "outside_compute": wall - compute,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="{}", help="AuditParams fields as JSON")
    parser.add_argument("--label", default=str(Path(unlearning_audit.__file__).parents[1]))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "store")
        params = AuditParams.model_validate({**json.loads(args.params), "store": store})
        stack = LocalStack(port=_free_port(), gpus=0, home=Path(tmp) / "home", store=store)
        with stack, temporary_settings({PREFECT_API_URL: stack.api_url}):
            start = time.perf_counter()
            run = run_deployment(
                "audit-checkpoint/audit",
                parameters={"params": params.model_dump(mode="json")},
                timeout=7200,
                poll_interval=2,
            )
            print(f"deployed audit {run.name}: {time.perf_counter() - start:.0f} s seen here")
            found = measure(run.id)
    for r in found["runs"]:
        print(f"  {r['name']:<40} {r['pool']}: {r['wall']:6.1f} s, compute {r['compute']:6.1f} s")
        if "tasks" in r:
            print(
                f"    {r['tasks']} task runs; pickup {r['pickup']:.1f} s, lead {r['lead']:.1f} s, "
                f"gaps {r['gaps']:.1f} s, tail {r['tail']:.1f} s"
            )
    print(
        "| code | audit | flow runs on a pool | audit wall time | hand-over (share) "
        "| per run | wall minus all compute |"
    )
    runs = len(found["runs"])
    print(
        f"| {args.label} | {found['state']} | {runs} | {found['wall']:.0f} s "
        f"| {found['handover']:.0f} s ({found['share']:.1%}) "
        f"| {found['handover'] / max(runs, 1):.1f} s | {found['outside_compute']:.0f} s |"
    )


if __name__ == "__main__":
    main()
