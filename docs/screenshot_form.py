"""Render the Prefect UI's custom-run form of the `audit` deployment to a PNG (docs/run-form.png).

    .venv/bin/python docs/screenshot_form.py [--out docs/run-form.png]

Starts a throwaway Prefect server on a free port with a temporary PREFECT_HOME (no telemetry),
creates the work pools and registers deployments/prefect.yaml with the project's own LocalStack
(no workers, no report server, no automations), finds the `audit` deployment's id through the
API and screenshots /deployments/deployment/<id>/run with headless Chromium (docs/screenshot.py),
again (at most 4 times) while the page is caught in its 0.25 s fade-in (no white pixel yet).
Everything it started is stopped and the temporary home removed, also on error.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # docs/screenshot.py

from screenshot import render_png

from unlearning_audit.server import LocalStack


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def faded_in(png: Path, sidebar: int = 300) -> bool:
    """Whether the page right of the sidebar has its white text: the UI's fade-in is over."""
    from matplotlib import image

    return bool(image.imread(png)[:, sidebar:, :3].min(axis=2).max() > 0.99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("run-form.png"))
    parser.add_argument("--width", type=int, default=1280, help="CSS pixels (default 1280)")
    parser.add_argument("--height", type=int, default=2720, help="CSS pixels (default 2720)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ua-form-") as home:
        quiet = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        os.environ.update({"PREFECT_HOME": home, **quiet})  # this process's Prefect client too
        stack = LocalStack(port=free_port(), gpus=1, home=Path(home), env=quiet)
        try:
            stack._spawn(
                "server", "server", "start", "--host", stack.host, "--port", str(stack.port)
            )
            stack.wait_healthy(180)
            stack.create_pools()
            stack.deploy()
            from prefect.client.orchestration import SyncPrefectClient

            with SyncPrefectClient(stack.api_url) as client:
                audit = client.read_deployment_by_name("audit-checkpoint/audit")
                # poll the pool once as a worker would, so the UI shows its queue ready
                client.get_scheduled_flow_runs_for_work_pool("cpu", work_queue_names=["default"])
            url = f"{stack.ui_url}/deployments/deployment/{audit.id}/run"
            for _ in range(4):
                render_png(url, args.out, args.width, args.height, budget_ms=20000)
                if faded_in(args.out):
                    break
            else:
                raise RuntimeError(f"{url} never rendered fully faded in")
        finally:
            stack.stop()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
