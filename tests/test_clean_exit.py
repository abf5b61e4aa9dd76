"""A killed or interrupted CLI leaves no Prefect server and no temporary folder behind.

Real processes throughout: the CLI runs an audit of the (default, slowly pretraining) embedded
model in a subprocess with its own PREFECT_HOME and temporary folder, and is killed (SIGKILL)
or stopped (SIGTERM) while its first model stage builds in a `ua-checkpoint-<pid>-*` folder.
Its processes are read from /proc before the signal. Then the owned temporary folders
(unlearning_audit.scratch) and the guard that ties a server to its parent (local_prefect).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unlearning_audit import scratch
from unlearning_audit.local_prefect import LocalAPI

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("unlearning-audit")
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


def _processes() -> dict[int, tuple[int, str]]:
    """Every process: pid -> (parent pid, state)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            table[int(entry)] = (int(fields[1]), fields[0])
    return table


def _descendants(pid: int) -> set[int]:
    table = _processes()
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        children = {p for p, (ppid, _) in table.items() if ppid == parent}
        todo += children - found
        found |= children
    return found


def _alive(pids: set[int]) -> set[int]:
    """The pids still running (a zombie waiting for init to reap it is not)."""
    table = _processes()
    return {p for p in pids if p in table and table[p][1] != "Z"}


def _wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _server_port(pids: set[int]) -> int:
    """The port of the uvicorn server among ``pids``, from its command line."""
    for pid in pids:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        if "uvicorn" in argv and "--port" in argv:
            return int(argv[argv.index("--port") + 1])
    raise AssertionError(f"no uvicorn server among {pids}")


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """One PREFECT_HOME for this module's CLI runs: the second finds its database made."""
    return tmp_path_factory.mktemp("prefect-home")


class Cli:
    """The CLI as a subprocess, with a private temporary folder, cache, store and log."""

    def __init__(self, tmp_path: Path, prefect_home: Path):
        self.tmp = tmp_path / "tmp"
        self.store = tmp_path / "store"
        self.log = tmp_path / "cli.log"
        self.config = tmp_path / "audit.json"
        self.env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        self.env.update(
            PREFECT_HOME=str(prefect_home),
            PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(prefect_home / "results"),
            UNLEARNING_AUDIT_TMP=str(self.tmp),
            UNLEARNING_AUDIT_CACHE=str(tmp_path / "cache"),
        )
        self.command = (
            [str(CLI)] if CLI.exists() else [sys.executable, "-m", "unlearning_audit.cli"]
        )
        self.cwd = tmp_path
        self.started: set[int] = set()

    def audit(self, control: bool = False) -> subprocess.Popen:
        """An audit of the embedded model, started; with ``control``, the control pretrains in
        a second thread beside the original."""
        self.config.write_text(json.dumps({"no_control": not control}))
        argv = ["audit", "--original", "embedded", "--config", str(self.config)]
        with open(self.log, "w") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                [*self.command, *argv, "--store", str(self.store)],
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started.add(proc.pid)
        return proc

    def building(self, proc: subprocess.Popen, count: int = 1) -> tuple[list[Path], set[int]]:
        """Wait for ``count`` model stages' folders; them, and the processes the CLI started."""

        def folders() -> list[Path]:  # a local store's builds lie in its key folders
            found = [*self.tmp.glob("ua-checkpoint-*"), *self.store.glob("*/*/ua-checkpoint-*")]
            return sorted(found)

        found = _wait_until(lambda: len(folders()) >= count or proc.poll() is not None, 240)
        assert found and proc.poll() is None, f"no stage folders:\n{self.log.read_text()}"
        tree = _descendants(proc.pid)
        self.started |= tree
        return folders(), tree

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.command, *argv, "--store", str(self.store)],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture
def cli(tmp_path, prefect_home):
    """A Cli; whatever it started and still runs is killed afterwards (a failed test)."""
    cli = Cli(tmp_path, prefect_home)
    yield cli
    for pid in _alive(cli.started):
        os.kill(pid, signal.SIGKILL)


def test_sigkill_leaves_no_server_and_the_next_start_removes_the_folder(cli):
    proc = cli.audit()
    [folder], tree = cli.building(proc)
    port = _server_port(tree)
    assert f"-{proc.pid}-" in folder.name and _listening(port)
    proc.kill()
    proc.wait()
    assert _wait_until(lambda: not _alive(tree), 10), f"left running: {_alive(tree)}"
    assert not _listening(port)
    assert folder.exists()  # a SIGKILL runs no cleanup: the next start's job

    done = cli.run("ls")
    assert done.returncode == 0, done.stderr
    assert not folder.exists()
    assert f"removed {folder}, left by a run that was killed" in done.stderr


def test_sigterm_exits_143_removing_the_folders_and_the_server(cli):
    proc = cli.audit()
    [folder], tree = cli.building(proc)
    port = _server_port(tree)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143
    log = cli.log.read_text()
    assert "unlearning-audit: SIGTERM: stopping" in log and "Traceback" not in log, log
    assert not folder.exists() and not _entries(cli.tmp), _entries(cli.tmp)
    assert _wait_until(lambda: not _alive(tree), 10), f"left running: {_alive(tree)}"
    assert not _listening(port)


def test_ctrl_c_with_a_stage_in_another_thread_exits_130_after_the_grace(cli):
    """The control pretrains in a task runner's thread, which no signal interrupts and Prefect
    waits for: the exit is forced after the grace, and that thread's folder goes too."""
    cli.env["UNLEARNING_AUDIT_EXIT_GRACE"] = "2"
    proc = cli.audit(control=True)
    folders, tree = cli.building(proc, count=2)
    port = _server_port(tree)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    log = cli.log.read_text()
    assert "unlearning-audit: SIGINT: stopping" in log and "Traceback" not in log, log
    assert "unlearning-audit: still running 2 s after SIGINT: exiting now" in log, log
    assert not any(f.exists() for f in folders) and not _entries(cli.tmp)
    assert _wait_until(lambda: not _alive(tree), 10), f"left running: {_alive(tree)}"
    assert not _listening(port)


GUARDED = """
import subprocess, sys, time
from unlearning_audit.local_prefect import spawn_guarded

grandchild = (
    "import subprocess, time; "
    "print(subprocess.Popen(['sleep', '600']).pid, flush=True); time.sleep(600)"
)
print(spawn_guarded([sys.executable, "-c", grandchild]).pid, flush=True)
time.sleep(600)
"""


def test_a_killed_parents_guarded_command_goes_with_what_it_started():
    """A server's own children (uvicorn workers) go too: the guard kills its process group."""
    parent = subprocess.Popen(
        [sys.executable, "-c", GUARDED], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    tree: set[int] = set()
    try:
        guard = int(parent.stdout.readline())
        sleeper = int(parent.stdout.readline())
        tree = _descendants(parent.pid)
        assert {guard, sleeper} <= tree and len(tree) == 3  # guard, its command, the sleeper
        parent.kill()
        parent.wait()
        assert _wait_until(lambda: not _alive(tree), 10), f"left running: {_alive(tree)}"
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        for pid in _alive(tree):
            os.kill(pid, signal.SIGKILL)


def test_a_configured_server_starts_nothing(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with LocalAPI(["json"]) as api:
        assert api.process is None and api.url is None
        assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:9/api"


OWNER = """
import os, signal, sys, time
from unlearning_audit import scratch

base, cache = sys.argv[1:]
owned = scratch.folder("checkpoint", parent=base)  # entered, never left: killed inside
stage = owned.__enter__()
(stage / "weights").write_bytes(b"x" * 1000)
part = scratch.mkdtemp(cache)
print(stage, part, flush=True)
time.sleep(600)
"""


def test_a_dead_owners_folders_are_removed_a_live_owners_kept(tmp_path):
    base, cache = tmp_path / "tmp", tmp_path / "cache"
    base.mkdir()
    cache.mkdir()
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(base), str(cache)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        stage, part = map(Path, owner.stdout.readline().split())
        assert stage.name.startswith(f"ua-checkpoint-{owner.pid}-")
        assert part.name.startswith(f".part-{owner.pid}-")
        assert scratch.clean_stale([base, cache]) == []  # alive: kept
        assert stage.exists() and part.exists()
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()
    assert sorted(scratch.clean_stale([base, cache])) == sorted([stage, part])
    assert not stage.exists() and not part.exists()


def test_a_folder_is_removed_when_its_block_ends_and_kept_while_it_runs(tmp_path):
    with pytest.raises(KeyboardInterrupt), scratch.folder("unlearn", parent=tmp_path) as folder:
        (folder / "model.safetensors").write_bytes(b"x")
        assert scratch.clean_stale([tmp_path]) == []  # this process holds it
        raise KeyboardInterrupt
    assert not folder.exists() and list(tmp_path.iterdir()) == []


def test_a_live_pid_does_not_keep_an_unlocked_folder_and_new_folders_are_left_alone(tmp_path):
    """The pid in the name is alive (this process, as after pid reuse), but nothing holds the
    folder: stale, since a folder gets its owned name only once it is locked. A folder still
    being created (not yet renamed) is never looked at."""
    folder = tmp_path / f"ua-data-{os.getpid()}-abcd1234"
    folder.mkdir()
    making = tmp_path / ".ua-new-abcd1234"
    making.mkdir()
    assert scratch.clean_stale([tmp_path]) == [folder]
    assert making.is_dir()
    with scratch.folder("data", tmp_path) as mine:
        assert mine.name.startswith(f"ua-data-{os.getpid()}-")
        assert scratch.clean_stale([tmp_path]) == [] and mine.is_dir()  # locked: its owner lives


def test_unrelated_names_and_other_users_folders_are_untouched(tmp_path):
    dead = _dead_pid()
    keep = [
        tmp_path / "ua-data-abcd1234",  # tempfile's old name: no owner
        tmp_path / ".part-abcd1234",
        tmp_path / f"other-{dead}-abcd1234",
        tmp_path / f"ua-data-{dead}-abcd12",  # not tempfile's 8 characters
    ]
    for path in keep:
        path.mkdir()
    (tmp_path / f"ua-file-{dead}-abcd1234").write_text("not a folder")
    (tmp_path / f"ua-link-{dead}-abcd1234").symlink_to(keep[0])
    keep += [tmp_path / f"ua-file-{dead}-abcd1234", tmp_path / f"ua-link-{dead}-abcd1234"]
    if os.geteuid() == 0:  # root can make another user's folder
        theirs = tmp_path / f"ua-data-{dead}-wxyz5678"
        theirs.mkdir()
        os.chown(theirs, 65534, 65534)
        keep.append(theirs)
    assert scratch.clean_stale([tmp_path]) == []
    assert all(path.exists() or path.is_symlink() for path in keep)


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _entries(folder: Path) -> list[Path]:
    """What ``folder`` holds (nothing where it was never made)."""
    return list(folder.iterdir()) if folder.exists() else []
