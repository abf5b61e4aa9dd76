"""A checkpoint folder read as an untrusted tree, and which names are a checkpoint's files.

Every reader of a checkpoint folder (identity, materialize, check_folder, describe, num_blocks,
the tokenizer check) reads it through ``_Tree``: only regular files directly inside it, never
through a link (a hub snapshot's links into its own repo's blobs excepted), never a FIFO or
device, and small files only up to METADATA_LIMIT.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ..store import file_kind
from .problems import _shown

WEIGHTS = ("*.safetensors", "*.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model*.bin", "pytorch_model*.bin.index.json")
METADATA = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
# The most a metadata file (config, tokenizer, index, model code) may hold: it is read whole.
# A real tokenizer.json holds 10 to 35 MB (a 256k vocabulary); an index some 100 kB.
METADATA_LIMIT = 64 * 2**20
_LIMITED = (*METADATA, "*.index.json", "*.py")
_CHUNK = 1 << 22


def wanted(name: str, allow_pickle: bool, trust_remote_code: bool = False) -> bool:
    """Whether a checkpoint file is copied: weights (pickle only if allowed), metadata, and the
    checkpoint's own model code (*.py) only where remote code is allowed."""
    return _matches(name, _patterns(allow_pickle, trust_remote_code))


def _patterns(allow_pickle: bool, trust_remote_code: bool = False) -> tuple[str, ...]:
    code = ("*.py",) if trust_remote_code else ()
    return WEIGHTS + METADATA + (PICKLE_WEIGHTS if allow_pickle else ()) + code


def _checkpoint_files(allow_pickle: bool) -> tuple[str, ...]:
    """The names of the files a checkpoint is made of: those its identity hashes (model code
    included, whether or not it may run). Every reader refuses an entry so named that is no
    readable regular file (a link, a FIFO), and no other: the rest of the folder is never read.
    """
    return _patterns(allow_pickle, trust_remote_code=True)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(Path(name).match(p) for p in patterns)


def _plain_name(name: str) -> bool:
    """A file name directly inside a folder: no separator, not "." or ".."."""
    return bool(name) and name not in (".", "..") and not re.search(r"[/\\\x00]", name)


class _Tree:
    """A checkpoint folder read as untrusted: only the regular files directly inside it.

    A link is refused, whatever it points to, except in a hub snapshot (``repo``: the repo's
    cache folder, the parent of snapshots/), whose files are links to its blobs: there a link is
    followed to a regular file inside ``repo`` only. Anything else that is not a regular file
    (FIFO, socket, device, a folder named like a checkpoint file) is refused without being
    opened, and so is a metadata file over METADATA_LIMIT. A file is opened without following
    links and without blocking, and the open descriptor must be the regular file that was
    checked: a file swapped for a link or a FIFO after the listing is refused too. Readers report
    the refusals of entries named like a checkpoint's files only (_checkpoint_files): nothing
    else in the folder is read.

    Hard links cannot be told apart from the file they link to: one to a file outside the folder
    reads as a regular file here. Making one needs write access to that file's file system (and,
    with Linux's protected_hardlinks, to the file itself); hub caches and deduplicating copies
    make harmless ones, so they are not refused.
    """

    def __init__(self, path: Path, repo: Path | None = None) -> None:
        self.path = Path(path)
        self.repo = repo
        self.files: set[str] = set()  # regular files (in a hub snapshot: links to one), readable
        self.refused: dict[str, str] = {}  # name: why it is not read
        try:
            with os.scandir(self.path) as entries:
                names = sorted(entry.name for entry in entries)
        except OSError as exc:
            raise ValueError(
                f"checkpoint {path}: the folder cannot be read ({exc.strerror})"
            ) from exc
        for name in names:
            try:
                if self._target(name) is not None:
                    self.files.add(name)
            except ValueError as exc:
                self.refused[name] = str(exc)

    def names(self, *patterns: str) -> list[str]:
        """The readable files matching any of ``patterns``, sorted."""
        return sorted(n for n in self.files if _matches(n, patterns))

    def refusals(self, *patterns: str) -> list[str]:
        """Why the entries matching any of ``patterns`` are refused."""
        return [p for n, p in self.refused.items() if _matches(n, patterns)]

    def _target(self, name: str) -> tuple[Path, os.stat_result] | None:
        """The path to open for ``name`` and its status, following a hub link; None for a folder
        with a name no checkpoint file has; a ValueError naming the entry if it is refused."""
        path, shown = self.path / name, _shown(name)
        try:
            status = os.lstat(path)
            if stat.S_ISLNK(status.st_mode):
                target = _shown(os.readlink(path))
                if self.repo is None:
                    raise ValueError(
                        f"{shown} is a symbolic link (to {target}); a checkpoint folder must hold "
                        "its files, not links to them (copy the folder with cp -rL to resolve "
                        "its links)"
                    )
                real = Path(os.path.realpath(path))
                if not real.is_relative_to(os.path.realpath(self.repo)):
                    raise ValueError(
                        f"{shown} is a link out of its hub repo's cache folder (to "
                        f"{_shown(str(real))})"
                    )
                path, status = real, os.lstat(real)
        except OSError as exc:
            raise ValueError(f"{shown} cannot be read ({exc.strerror})") from exc
        if stat.S_ISDIR(status.st_mode) and not _matches(name, _patterns(True, True)):
            return None
        if not stat.S_ISREG(status.st_mode):
            raise ValueError(f"{shown} is {file_kind(status.st_mode)}, not a regular file")
        _check_size(name, status.st_size)
        return path, status

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        """``name`` opened for reading (see the class docstring); a ValueError naming it if it
        is refused."""
        if name in self.refused:
            raise ValueError(self.refused[name])
        target = self._target(name)
        if target is None:
            raise ValueError(f"{name} is a folder, not a regular file")
        path, status = target
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
        except OSError as exc:
            raise ValueError(f"{_shown(name)} cannot be opened ({exc.strerror})") from exc
        with os.fdopen(fd, "rb") as f:
            now = os.fstat(fd)
            if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (
                status.st_dev,
                status.st_ino,
            ):
                raise ValueError(f"{_shown(name)} was replaced while it was being opened")
            _check_size(name, now.st_size)
            yield f

    def read(self, name: str) -> bytes:
        """A metadata file's bytes (at most METADATA_LIMIT, also if it grows meanwhile)."""
        with self.open(name) as f:
            data = f.read(METADATA_LIMIT + 1)
        _check_size(name, len(data), True)
        return data

    def json(self, name: str) -> Any:
        """A JSON file's content; a ValueError naming the file if it does not parse."""
        data = self.read(name)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{name} is not valid JSON ({exc})") from exc
        except RecursionError as exc:
            raise ValueError(f"{name} is not valid JSON (nested too deeply)") from exc

    def copy(self, name: str, dest: Path) -> str:
        """Copy ``name`` into ``dest`` from the descriptor it was checked on; the copy's sha256."""
        with self.open(name) as src, _create(dest / name) as out:
            return _pipe(src, out)

    def sha256(self, name: str) -> str:
        with self.open(name) as f:
            return _pipe(f)


def _pipe(src: IO[bytes], out: IO[bytes] | None = None) -> str:
    """The sha256 of what ``src`` holds, read in chunks (and written to ``out`` if given)."""
    h = hashlib.sha256()
    while chunk := src.read(_CHUNK):
        h.update(chunk)
        if out is not None:
            out.write(chunk)
    return h.hexdigest()


def _create(path: Path) -> IO[bytes]:
    """``path`` created (or emptied) for writing, never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    return os.fdopen(os.open(path, flags, 0o644), "wb")


def _check_size(name: str, size: int, read: bool = False) -> None:
    """Refuse a metadata file (config, tokenizer, index, model code) over METADATA_LIMIT."""
    if size > METADATA_LIMIT and _matches(name, _LIMITED):
        held = f"more than {METADATA_LIMIT / 2**20:.1f}" if read else f"{size / 2**20:.1f}"
        raise ValueError(
            f"{_shown(name)} is {held} MiB, over the {METADATA_LIMIT // 2**20} MiB limit for "
            "checkpoint metadata"
        )


def _fd_path(f: IO[bytes]) -> str:
    """A path that opens the very file ``f`` has open (for readers that take only a path)."""
    proc = f"/proc/self/fd/{f.fileno()}"
    return proc if os.path.exists(proc) else f"/dev/fd/{f.fileno()}"
