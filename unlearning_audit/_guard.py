"""Run a command that must not outlive the process that started this guard (Linux).

Usage: ``python -I _guard.py PARENT_PID GRACE COMMAND...``, started as the leader of a new
process group by PARENT_PID.

The kernel sends this guard SIGTERM when its parent dies, however it dies, SIGKILL included
(PR_SET_PDEATHSIG); so do SIGTERM, SIGINT and SIGHUP from anyone. The guard then asks the command
to stop (SIGTERM), waits up to GRACE seconds, and kills its whole process group, itself included:
the command and everything it started that stayed in the group. The command gets SIGKILL from
the kernel should the guard itself be killed. If the command ends by itself, the guard ends with
its exit code. Standard library only (run with -I), so it starts in a few milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1


class _Stop(Exception):
    pass


_stopping: list[int] = []


def die_with_parent(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies; False if it can't
    (not Linux)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _stop(signum, frame) -> None:
    if not _stopping:  # once: a second signal must not break off the stopping
        _stopping.append(signum)
        raise _Stop


def main(argv: list[str]) -> int:
    parent, grace, command = int(argv[0]), float(argv[1]), argv[2:]
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _stop)
    guard = os.getpid()

    def child_setup() -> None:  # in the forked child, before exec; the guard has one thread
        die_with_parent(signal.SIGKILL)
        if os.getppid() != guard:  # the guard died before the line above
            os._exit(1)

    child = None
    try:
        die_with_parent(signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the line above
            return 1
        child = subprocess.Popen(command, preexec_fn=child_setup)
        return child.wait()
    except _Stop:
        pass
    finally:
        _stopping.append(0)
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
            deadline = time.monotonic() + grace
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
    os.killpg(os.getpgrp(), signal.SIGKILL)  # whatever is left in the group, this guard too
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
