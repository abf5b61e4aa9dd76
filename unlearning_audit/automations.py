"""The Prefect automations `unlearning-audit server` ships, and where their notifications go.

* **Crash silent flow runs**: flow runs send a heartbeat every HEARTBEAT_SECONDS (the stack sets
  PREFECT_FLOWS_HEARTBEAT_FREQUENCY for its workers); one that stays silent for SILENT_SECONDS
  without finishing had its process die (a worker's machine lost, an out-of-memory kill), and is
  marked Crashed: its pool slot frees and the UI offers Retry. (Prefect's own recipe for
  self-hosted servers.)
* **Notify on a failed audit**: an `audit-checkpoint` flow run that ends Failed or Crashed sends a
  notification through the webhook block NOTIFY_BLOCK: to ``--notify-url`` (Slack and most chat
  tools take its JSON ``{"text": ...}``), else to the stack's own listener, which prints it on
  the `unlearning-audit server` console and appends it to ``notifications.log`` in the stack's
  log folder.

Both are created where the server lacks one of that name, and left as they are otherwise (edited
or paused in the UI, they stay so); the block always follows the server's options.
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HEARTBEAT_SECONDS = 30  # Prefect's minimum
SILENT_SECONDS = 90
ZOMBIE = "unlearning-audit: crash silent flow runs"
FAILED = "unlearning-audit: notify on a failed audit"
NOTIFY_BLOCK = "unlearning-audit-notify"
AUDIT_FLOW = "audit-checkpoint"


def zombie_automation():
    """Mark Crashed a flow run that sent a heartbeat, then nothing for SILENT_SECONDS."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    ends = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    return AutomationCore(
        name=ZOMBIE,
        description=f"Marks Crashed a flow run silent for {SILENT_SECONDS} s (its process died)",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *ends},
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=SILENT_SECONDS),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {SILENT_SECONDS} s: the flow run's process died; "
                "retry it to resume at its first stage not stored",
            )
        ],
    )


def failed_audit_automation(block_id):
    """Notify through block ``block_id`` when an audit flow run ends Failed or Crashed."""
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=FAILED,
        description="Sends a notification when an audit run fails or crashes.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": AUDIT_FLOW},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject="unlearning-audit: audit {{ flow_run.name }} {{ flow_run.state.name }}",
                body="audit {{ flow_run.name }} ended {{ flow_run.state.name }}: "
                "{{ flow_run.state.message }} ({{ flow_run|ui_url }})",
            )
        ],
    )


def ensure(api_url: str, notify_url: str) -> list[str]:
    """Save the notification block for ``notify_url`` and create the automations the server
    at ``api_url`` lacks; return the names created."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    block = CustomWebhookNotificationBlock(
        name="unlearning-audit",
        url=notify_url,
        json_data={"text": "{{subject}}\n{{body}}"},
        allow_private_urls=True,  # the stack's own listener is on 127.0.0.1
    )
    with temporary_settings({PREFECT_API_URL: api_url}):
        block_id = block.save(NOTIFY_BLOCK, overwrite=True)
    created = []
    with SyncPrefectClient(api_url) as client:
        for automation in (zombie_automation(), failed_audit_automation(block_id)):
            if not client.read_automations_by_name(automation.name):
                client.create_automation(automation)
                created.append(automation.name)
    return created


class _Listener(BaseHTTPRequestHandler):
    """POSTed notifications: printed and appended to a log file, one line each."""

    log: Path  # set on the subclass listen() makes

    def do_POST(self) -> None:
        size = min(int(self.headers.get("Content-Length") or 0), 1 << 20)
        try:
            text = str(json.loads(self.rfile.read(size)).get("text", ""))
        except (ValueError, AttributeError):
            self.send_error(HTTPStatus.BAD_REQUEST, "expected JSON with a text field")
            return
        line = " | ".join(text.splitlines())
        with open(self.log, "a") as f:
            f.write(line + "\n")
        print(f"notification: {line}", flush=True)
        self.send_response(HTTPStatus.NO_CONTENT)
        self.end_headers()

    def log_message(self, format: str, *args) -> None:
        """Quiet: the notification itself is the news."""


def listen(log: Path, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """The stack's notification listener on a free port of ``host``, from a daemon thread;
    ``shutdown()`` stops it."""
    handler = type("NotificationListener", (_Listener,), {"log": log})
    server = ThreadingHTTPServer((host, 0), handler)
    threading.Thread(target=server.serve_forever, name="notifications", daemon=True).start()
    return server
