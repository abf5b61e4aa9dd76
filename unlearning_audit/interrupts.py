"""Ctrl-C and SIGTERM end the CLI in order, and soon; a killed CLI's leftovers go at the next start.

``start_cli()`` is the CLI's first step when it runs as the program. It makes SIGINT and SIGTERM
raise ``Interrupted``, a SystemExit with the shell's code for the signal (130, 143): every
``with`` and ``finally`` on the way out runs, so the stages' temporary folders are removed and
the local Prefect server stops, and the process ends with that code and one line on stderr, not
a traceback. While a flow runs, Prefect puts its own SIGTERM handler in front of this one (it
marks the run crashed, then hands the signal on), so a watchdog thread sees every signal itself,
through ``signal.set_wakeup_fd``, whichever handler runs; and a Python handler runs only between
two bytecodes of the main thread, which a long native call (a tokenizer's training) can hold up.
At the first signal the watchdog prints the line. If the process is still there ``grace``
seconds later ($UNLEARNING_AUDIT_EXIT_GRACE, default 5: a stage running in another thread cannot
be interrupted, and Prefect waits for it), or at a second Ctrl-C, it removes the folders the
process still owns, kills its Prefect server and exits at once, with the same code. A command
that installs handlers of its own (``server``) is left to stop in its own time.

A SIGKILL runs no code at all: ``start_cli()`` also removes the temporary folders that killed
runs left (``scratch.clean_stale``); their Prefect server died with them (see local_prefect).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time

from . import local_prefect, scratch

GRACE_ENV = "UNLEARNING_AUDIT_EXIT_GRACE"
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(SystemExit):
    """SIGINT or SIGTERM: a SystemExit with code 128 + the signal's number."""


_raised: list[int] = []


def _raise(signum: int, frame) -> None:
    if not _raised:  # once: a second signal must not break off the cleanup the first started
        _raised.append(signum)
        raise Interrupted(128 + signum)


def _say(text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, f"unlearning-audit: {text}\n".encode())  # no lock: safe from any thread


def _force(signum: int, why: str) -> None:
    _say(f"{why}: exiting now")
    with contextlib.suppress(Exception):
        local_prefect.kill_all()
    with contextlib.suppress(Exception):
        scratch.remove_all()
    os._exit(128 + signum)


def _handled_here(signum: int) -> bool:
    """Whether the signal's handler is this module's, or Prefect's (in front while a flow
    runs); a command with its own (``server``) stops in its own time."""
    handler = signal.getsignal(signum)
    return handler is _raise or getattr(handler, "__module__", "").startswith("prefect.")


def _watch(read_fd: int, grace: float) -> None:
    first = None
    deadline = None
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([read_fd], [], [], timeout)
        if not ready:
            _force(first, f"still running {grace:g} s after {signal.Signals(first).name}")
        for signum in os.read(read_fd, 64):
            if signum not in SIGNALS or not _handled_here(signum):
                continue
            if first is None:
                first, deadline = signum, time.monotonic() + grace
                again = "; Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
                _say(
                    f"{signal.Signals(signum).name}: stopping, removing temporary folders and "
                    f"the local Prefect server{again}"
                )
            elif signum == signal.SIGINT:
                _force(first, "Ctrl-C again")


def install(grace: float | None = None) -> bool:
    """SIGINT and SIGTERM raise Interrupted, and a watchdog forces the exit ``grace`` seconds
    later (see the module docstring). Main thread only; False elsewhere (nothing changed)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if grace is None:
        grace = _grace()
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    for signum in SIGNALS:
        signal.signal(signum, _raise)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(
        target=_watch, args=(read_fd, grace), name="unlearning-audit-exit", daemon=True
    ).start()
    return True


def _grace() -> float:
    """$UNLEARNING_AUDIT_EXIT_GRACE in seconds (default 5); a ValueError naming it if it is not
    a number of seconds."""
    text = os.environ.get(GRACE_ENV) or "5"
    try:
        grace = float(text)
    except ValueError:
        grace = -1.0
    if not 0 <= grace < float("inf"):
        raise ValueError(f"${GRACE_ENV}={text!r} is not a number of seconds")
    return grace


def start_cli(store: str | None = None) -> None:
    """The CLI's first step as a program: ``install()``, then remove the temporary folders
    killed runs left (named on stderr): in the temporary folder, and the builds in the local
    store ``store`` (Store.clean_stale_builds)."""
    install()
    stale = scratch.clean_stale()
    if store is not None:
        from .store import Store

        with contextlib.suppress(ValueError):  # an invalid store URL is the command's to report
            stale += Store(store).clean_stale_builds()
    for path in stale:
        _say(f"removed {path}, left by a run that was killed")
