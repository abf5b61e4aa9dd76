"""Temporary folders with an owner, so that a killed process's folders can be found and removed.

A stage builds its artifact in a temporary folder before the store keeps it; at 7B scale that
folder holds many GB. A process that exits, or is interrupted, removes its folders itself; one
killed outright (SIGKILL, the OOM killer) cannot, so the next CLI start removes them
(``clean_stale``).

A folder is named ``ua-<stage>-<pid>-<random>`` under the base folder ($UNLEARNING_AUDIT_TMP,
else the system's temporary folder), or ``.part-<pid>-<random>`` in the store's cache, and its
owner holds an exclusive ``flock`` on it for as long as it lives. The kernel drops the lock when
the owner dies, however it dies, so a lock that can be taken means the owner is gone. A lock is
on an open file, not a pid: a pid reused by another process, a process in another pid namespace
(containers sharing the cache volume) or a reboot cannot make a live owner's folder look stale.
The pid in the name is for people: a folder is made under a name that no cleaner looks at,
locked, and only then renamed to its owned name, so an owned name that is not locked is never a
folder whose owner is about to lock it. Only folders of this user whose
names have the owner form are ever looked at; where no lock can be taken at all (a filesystem
without flock), nothing is removed.

Plain Python: no Prefect, no torch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

TMP_ENV = "UNLEARNING_AUDIT_TMP"
CACHE_ENV = "UNLEARNING_AUDIT_CACHE"
STAGE_PREFIX = "ua-"
PART_PREFIX = ".part-"
_OWNED = re.compile(r"^(?:ua-.+|\.part)-(?P<pid>[0-9]+)-[a-z0-9_]{8}$")
"""An owned folder's name: tempfile's 8 random characters after the owner's pid."""
_NEW = ".ua-new-"
"""A folder's name from its creation until it is locked (no cleaner looks at it)."""

_held: dict[str, int] = {}
"""This process's owned folders and the locked descriptor of each."""
_held_lock = threading.Lock()


def base() -> Path:
    """Where stage folders go: $UNLEARNING_AUDIT_TMP, else the system's temporary folder."""
    return Path(os.environ.get(TMP_ENV) or tempfile.gettempdir())


def cache_dir() -> Path:
    """The local cache of remote store artifacts (Store's default), where ``.part-`` folders
    go: $UNLEARNING_AUDIT_CACHE, else ~/.cache/unlearning-audit."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "unlearning-audit")


def _create(parent: Path, prefix: str) -> Path:
    """A new folder ``<prefix><pid>-<random>`` in ``parent``, locked by this process before it
    has that name (see the module docstring)."""
    made = tempfile.mkdtemp(prefix=_NEW, dir=parent)
    fd = os.open(made, os.O_RDONLY | os.O_DIRECTORY)  # not inherited by exec'd children
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:  # a filesystem without flock: the folder stays unowned, never stale
        log.debug("cannot lock %s: %s", made, exc)
    path = os.path.join(parent, f"{prefix}{os.getpid()}-{made[-8:]}")  # mkdtemp's 8 characters
    os.rename(made, path)  # the lock is on the folder itself: it moves with it
    with _held_lock:
        _held[path] = fd
    return Path(path)


def _release(path: str) -> None:
    with _held_lock:
        fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)


def _rmtree(path: str | Path) -> None:
    """Remove a folder tree, making read-only folders in it writable where that stops removal."""
    root = os.fspath(path)

    def retry(func, name, *_):
        parent = os.path.dirname(name)
        with contextlib.suppress(OSError):
            if parent == root or parent.startswith(root + os.sep):  # never outside the tree
                os.chmod(parent, stat.S_IRWXU)
            func(name)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def folder(stage: str, parent: str | Path | None = None) -> Iterator[Path]:
    """A temporary folder ``ua-<stage>-<pid>-<random>`` (under ``base()`` unless ``parent`` is
    given), removed when the block ends, however it ends (an exception, KeyboardInterrupt,
    SystemExit); one a kill leaves behind goes at the next ``clean_stale``."""
    where = Path(parent) if parent is not None else _ensure(base())
    path = _create(where, f"{STAGE_PREFIX}{stage}-")
    try:
        yield path
    finally:
        _rmtree(path)
        _release(str(path))  # not before: a removal cut short stays this process's to finish


def mkdtemp(parent: str | Path, prefix: str = PART_PREFIX) -> Path:
    """Like ``tempfile.mkdtemp``: a new folder ``<prefix><pid>-<random>`` in ``parent`` (made if
    missing) for the caller to move into place or remove. The lock that marks it as this
    process's is held until the folder is gone from that name (moved or removed: checked at the
    next call) or the process ends."""
    with _held_lock:
        gone = [p for p in _held if not os.path.lexists(p)]
    for p in gone:
        _release(p)
    return _create(_ensure(Path(parent)), prefix)


def remove_all() -> list[str]:
    """Remove every folder this process still owns (a forced exit's cleanup); their paths."""
    with _held_lock:
        paths = list(_held)
    for path in paths:
        with contextlib.suppress(OSError):
            _rmtree(path)
        _release(path)
    return paths


def _stale(path: Path) -> int | None:
    """A locked descriptor of ``path`` if its owner is gone (its lock can be taken), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            raise BlockingIOError  # never another user's
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, None):
            log.debug("cannot lock %s: %s", path, exc)
        return None
    return fd


def in_use(path: str | Path) -> bool:
    """Whether ``path`` is an owned folder (``ua-*``, ``.part-*``) whose owner still runs (or
    that is another user's): not a leftover to remove."""
    path = Path(path)
    if _OWNED.match(path.name) is None or not path.is_dir():
        return False
    fd = _stale(path)
    if fd is None:
        return True
    os.close(fd)
    return False


def clean_stale(folders: Iterable[str | Path] | None = None) -> list[Path]:
    """Remove the owned folders (``ua-*`` and ``.part-*`` with an owner pid) in ``folders``
    (default: ``base()`` and ``cache_dir()``) whose owner process is gone; returns them.

    Folders of live owners, of other users, with other names, and anything that is not a
    folder, are left alone.
    """
    removed = []
    for parent in [base(), cache_dir()] if folders is None else folders:
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue
        for entry in entries:
            match = _OWNED.match(entry.name)
            if match is None or not entry.is_dir(follow_symlinks=False):
                continue
            path = Path(entry.path)
            fd = _stale(path)
            if fd is None:
                continue
            try:
                _rmtree(path)
            finally:
                os.close(fd)
            log.info("removed %s, left by process %s", path, match["pid"])
            removed.append(path)
    return removed


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
