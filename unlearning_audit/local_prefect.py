"""A temporary local Prefect API that cannot outlive this process.

Run with no Prefect server configured, Prefect 3 starts a temporary ("ephemeral") API server as a
child process (``SubprocessASGIServer``) and stops it when the process exits normally. A CLI
killed outright (SIGKILL, the OOM killer) cannot stop it: it stays, reparented to init, still
listening. ``LocalAPI`` starts the same server itself, with Prefect's own command and settings
(uvicorn on a free port of 127.0.0.1, SQLite in PREFECT_HOME, no UI), and points Prefect at it
(PREFECT_API_URL), so Prefect never starts one of its own. The server runs under ``_guard.py``, in
a process group of its own: the kernel tells the guard when this process dies, however it dies,
and the guard then stops the server and kills everything left in its group (uvicorn workers or
any other grandchild). Leaving the ``with`` block stops it all.

With a server configured (PREFECT_API_URL in the environment or in a Prefect profile), or with
Prefect's temporary servers disabled (PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=false), it does
nothing. Prefect is imported when the block is entered, never when this module is imported.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

GUARD = Path(__file__).with_name("_guard.py")
PORT_IN_USE = 3  # uvicorn's exit code when it cannot bind its port

_running: set[LocalAPI] = set()
_running_lock = threading.Lock()


class LocalAPI:
    """``with LocalAPI(): ...`` runs the block against a temporary local Prefect API, unless a
    server is configured (then ``url`` stays None and nothing starts).

    ``preload``: modules to import while the server starts (the flows a command runs, which
    take seconds to import); ``grace``: seconds the server has to stop before it is killed.
    Enter it in the thread that stays alive for the whole block (the main thread): the kernel
    signals the guard when the thread that started it ends.
    """

    def __init__(self, preload: Iterable[str] = (), grace: float = 5.0):
        self.preload = tuple(preload)
        self.grace = grace
        self.url: str | None = None
        self.process: subprocess.Popen | None = None
        self._settings = contextlib.ExitStack()
        self._saved_env: str | None = None

    def __enter__(self) -> LocalAPI:
        if not _needed():
            for module in self.preload:
                importlib.import_module(module)
            return self
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def _start(self) -> None:
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        env = _server_env(settings)  # before PREFECT_API_URL names the server
        deadline = time.monotonic() + settings.server.ephemeral.startup_timeout_seconds
        preload = self.preload
        for _ in range(3):
            port = _free_port()
            self.process = spawn_guarded(_server_command(port), env, self.grace)
            with _running_lock:
                _running.add(self)
            self._point_prefect(f"http://127.0.0.1:{port}/api")
            for module in preload:  # while the server starts
                importlib.import_module(module)
            preload = ()
            code = self._wait_healthy(deadline)
            if code is None:
                log.debug("local Prefect API at %s", self.url)
                return
            if code != PORT_IN_USE:
                raise RuntimeError(f"the local Prefect server exited with code {code}")
            self._stop()
        raise RuntimeError("the local Prefect server found no free port in 3 tries")

    def _point_prefect(self, url: str) -> None:
        """PREFECT_API_URL = url: in the environment (child processes, and threads that start
        with a fresh context see Prefect's global settings, rebuilt from it) and in this
        thread's settings context."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        self.url = url
        self._saved_env = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        _refresh_prefect_settings()
        self._settings.enter_context(temporary_settings(updates={PREFECT_API_URL: url}))

    def _wait_healthy(self, deadline: float) -> int | None:
        """None once the API answers its health check; the guard's exit code if it ends first
        (the server's own); RuntimeError past the deadline."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                return code
            try:
                with opener.open(f"{self.url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return None
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(
            "the local Prefect server did not answer within "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
        )

    def _stop(self) -> None:
        """Flush Prefect's logs and events to the server, point Prefect back where it was, and
        stop the server (the guard stops it and kills its group)."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            _drain_prefect()
        self._settings.close()
        if self._saved_env is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = self._saved_env
        _refresh_prefect_settings()
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(self.grace + 5)
        except subprocess.TimeoutExpired:  # not reaped yet, so its group id is still its own
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.process = None
        self.url = None
        with _running_lock:
            _running.discard(self)


def spawn_guarded(
    command: list[str], env: dict[str, str] | None = None, grace: float = 5.0
) -> subprocess.Popen:
    """Start ``command`` under ``_guard.py``, which this returns: it leads a new process group
    (so Ctrl-C in a terminal reaches neither), and when this process (this thread) dies, or
    the guard gets SIGTERM, the command gets SIGTERM and, ``grace`` seconds later, the whole
    group SIGKILL."""
    guard = [sys.executable, "-I", str(GUARD), str(os.getpid()), str(grace)]
    return subprocess.Popen([*guard, *command], env=env, start_new_session=True)


def kill_all() -> None:
    """Kill every server this process started, at once (a forced exit's cleanup)."""
    with _running_lock:
        running = list(_running)
    for api in running:
        proc = api.process
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


def server_configured() -> bool:
    """Whether runs go to a configured Prefect server (where they are recorded), not to a
    temporary one this process would start."""
    return not _needed()


def _needed() -> bool:
    """No server configured, and Prefect allowed to start a temporary one."""
    if os.environ.get("PREFECT_API_URL"):
        return False
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return not settings.api.url and settings.server.ephemeral.enabled


def _server_command(port: int) -> list[str]:
    """The command Prefect's SubprocessASGIServer runs."""
    import prefect

    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(prefect.__module_path__.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]


def _server_env(settings) -> dict[str, str]:
    """The environment Prefect's SubprocessASGIServer gives its server."""
    return {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **settings.to_environment_variables(exclude_unset=True),
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _refresh_prefect_settings() -> None:
    """Rebuild Prefect's process-wide settings from the environment (where Prefect is loaded)."""
    context = sys.modules.get("prefect.context")
    if context is None:
        return
    refresh = getattr(context, "refresh_global_settings_context", None)
    if refresh is not None:
        refresh()
    else:  # an older Prefect
        context.GLOBAL_SETTINGS_CONTEXT = context.root_settings_context()


def _drain_prefect(timeout: float = 5.0) -> None:
    """Send the logs and events Prefect still holds, before their server goes."""
    if "prefect" not in sys.modules:
        return
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=timeout)
        EventsWorker.drain_all(timeout=timeout)
    except Exception as exc:  # best effort: a run's result never depends on it
        log.debug("could not drain Prefect's log and event workers: %s", exc)
