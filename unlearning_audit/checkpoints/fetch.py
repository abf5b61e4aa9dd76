"""Where a checkpoint comes from: its spec parsed, a hub revision pinned to its commit, the
identity that keys its fetch (file hashes, ETags or the hub commit), and its copy, which must be
exactly that identity."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from ..store import filesystem
from .problems import _printable, _refuse, _some
from .tree import _check_size, _checkpoint_files, _create, _patterns, _pipe, _Tree, wanted

EMBEDDED = "embedded"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+@[\w./-]+$")


class CheckpointChanged(RuntimeError):
    """A checkpoint changed between the identity that keys its fetch and its copy, or while it
    was copied. Not bad input (a ValueError, which no stage retries): a retry cures it once the
    checkpoint stops changing."""


@dataclass(frozen=True)
class CheckpointSpec:
    """A parsed checkpoint spec (see the module docstring)."""

    kind: Literal["embedded", "local", "remote", "hub"]
    location: str
    revision: str | None = None


def parse(spec: str) -> CheckpointSpec:
    """Parse a checkpoint spec; a local path that does not exist is an error naming it."""
    spec = spec.strip()
    if spec == EMBEDDED:
        return CheckpointSpec("embedded", EMBEDDED)
    if "://" in spec:
        return CheckpointSpec("remote", spec.rstrip("/"))
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"checkpoint {spec!r} is a file; give the folder that holds it")
        return CheckpointSpec("local", str(path.resolve()))
    if _HUB_ID.match(spec):
        repo, revision = spec.split("@", 1)
        return CheckpointSpec("hub", repo, revision)
    if "/" in spec and "@" not in spec and not spec.startswith((".", "/", "~")):
        raise ValueError(
            f"checkpoint {spec!r}: a hub id needs a pinned revision, e.g. {spec}@main or "
            f"{spec}@<commit>; no local folder of that name exists either"
        )
    raise ValueError(f"checkpoint path {spec!r} does not exist")


def pin(spec: CheckpointSpec) -> CheckpointSpec:
    """A hub spec with its revision resolved to the commit it names now; others unchanged.

    Fetching the pinned spec copies exactly that commit, even if the branch moves meanwhile.
    """
    if spec.kind != "hub":
        return spec
    return replace(spec, revision=_snapshot(spec, ("config.json",)).name)


def _snapshot(spec: CheckpointSpec, patterns: tuple[str, ...]) -> Path:
    """The hub snapshot folder of a revision (named by its commit), downloaded where needed."""
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(spec.location, revision=spec.revision, allow_patterns=list(patterns))
    )


def _hub_repo(snapshot: Path) -> Path | None:
    """The repo cache folder a hub snapshot's links may point into
    (``models--org--name/snapshots/<commit>``), or None where ``snapshot`` is not laid out as
    one (its links are then refused)."""
    repo = snapshot.parent.parent
    laid_out = snapshot.parent.name == "snapshots" and repo.name.startswith("models--")
    return repo if laid_out else None


def _local_root(spec: CheckpointSpec) -> Path | None:
    """The folder of a local spec, or of a file:// URL (read as a local folder, links refused)."""
    if spec.kind == "local":
        return Path(spec.location)
    if spec.kind == "remote":
        fs, root = filesystem(spec.location)
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        if "file" in protocols or "local" in protocols:
            return Path(root)
    return None


def identity(spec: CheckpointSpec, allow_pickle: bool = False) -> dict:
    """What a checkpoint's content is known by before it is copied: the sha256 of every file
    that may be copied (model code included) of a local folder (or file:// URL), the ETag of
    every such remote object (its sha256, read whole, where the backend gives no ETag: a size
    and mtime do not tell content), or the hub commit of a pinned spec.

    ``materialize`` checks that what it copies is still this."""
    root = _local_root(spec)
    if root is not None:
        tree = _Tree(root)
        _refuse(root, tree.refusals(*_checkpoint_files(allow_pickle)))
        found = {name: tree.sha256(name) for name in tree.names(*_checkpoint_files(allow_pickle))}
    elif spec.kind == "remote":
        fs, path = filesystem(spec.location)
        found = {
            name: _etag(info) or _remote_sha256(fs, info["name"])
            for name, info in _listing(fs, path).items()
            if wanted(name, allow_pickle, True)
        }
    else:
        return {"repo": spec.location, "commit": spec.revision}
    return found


def _listing(fs, path: str) -> dict[str, dict]:
    """The files directly under a remote prefix, by name, as they are now (a long-lived worker's
    cached listing is dropped first)."""
    fs.invalidate_cache(path)
    return {
        i["name"].rsplit("/", 1)[-1]: i for i in fs.ls(path, detail=True) if i["type"] == "file"
    }


def _etag(info: dict) -> str | None:
    """A listed remote file's ETag, however its backend spells the key (s3fs ETag, gcsfs and
    adlfs etag); None where it gives none."""
    return next((str(v) for k, v in info.items() if k.lower() == "etag" and v), None)


def _version(info: dict) -> str:
    """What a listed remote file's version is known by: its ETag, else its size and mtime."""
    return _etag(info) or str((info.get("size"), info.get("mtime")))


def _remote_sha256(fs, remote: str, dest: Path | None = None) -> str:
    """The sha256 of a remote file, read in chunks (and written to ``dest`` if given). On S3 the
    reads are conditional on the ETag the listing gave (s3fs sends If-Match): a file replaced
    since fails to read (FileExpired)."""
    with fs.open(remote, "rb") as src:
        if dest is None:
            return _pipe(src)
        with _create(dest) as out:
            return _pipe(src, out)


def materialize(
    spec: CheckpointSpec,
    dest: Path,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    *,
    expected: dict,
) -> dict:
    """Copy the checkpoint's weights, config and tokenizer files into ``dest``.

    What is copied must be what ``expected`` (the spec's ``identity``, which keys the copy)
    names: a file changed, added or removed since is refused (CheckpointChanged). A local
    file is hashed as it is copied, from the descriptor it was checked on; a remote one as it
    is downloaded, and the prefix is listed again afterwards: a file listed otherwise then
    changed while it was copied, and is refused too. Links, FIFOs and the like are refused (see
    _Tree); a hub snapshot's links are followed into its repo's cache only.

    Returns provenance: for the hub, the commit the files came from (give a pinned spec).
    """
    if spec.kind == "hub":
        folder = _snapshot(spec, _patterns(allow_pickle, trust_remote_code))
        _copy_local(folder, dest, allow_pickle, trust_remote_code, _hub_repo(folder))
        return {"commit": folder.name}
    root = _local_root(spec)
    if root is not None:
        copied = _copy_local(root, dest, allow_pickle, trust_remote_code)
        _check_unchanged(root, copied, expected, allow_pickle, trust_remote_code, "sha256")
        return {}
    fs, path = filesystem(spec.location)
    listed = _listing(fs, path)
    if not listed:
        raise ValueError(f"checkpoint {spec.location!r} is empty or does not exist")
    take = {n: i for n, i in listed.items() if wanted(n, allow_pickle, trust_remote_code)}
    # before anything is downloaded, what the listing tells: names, and ETags where there are
    # some (a file without one is checked by its hash once copied)
    seen = {n: _etag(i) or expected.get(n, "") for n, i in take.items()}
    _check_unchanged(spec.location, seen, expected, allow_pickle, trust_remote_code, "ETag")
    problems = []
    for name, info in sorted(take.items()):
        try:
            _check_size(name, int(info.get("size") or 0))
        except ValueError as exc:
            problems.append(str(exc))
    _refuse(spec.location, problems)
    hashed = {n: _remote_sha256(fs, i["name"], dest / n) for n, i in sorted(take.items())}
    _check_copied_as_listed(spec.location, take, _listing(fs, path), dest)
    copied = {n: _etag(i) or hashed[n] for n, i in take.items()}
    _check_unchanged(spec.location, copied, expected, allow_pickle, trust_remote_code, "sha256")
    return {}


def _check_copied_as_listed(
    where: str, listed: dict[str, dict], now: dict[str, dict], dest: Path
) -> None:
    """Refuse a remote copy (CheckpointChanged) of files that are listed otherwise once copied
    (``now``: another ETag, or size and mtime, or gone) or whose copy's size is not the one
    listed: the bytes downloaded may not be the version the listing named."""
    moved = [
        name
        for name, info in sorted(listed.items())
        if name not in now
        or _version(now[name]) != _version(info)
        or info.get("size") not in (None, (dest / name).stat().st_size)
    ]
    if moved:
        raise CheckpointChanged(
            f"checkpoint {where}: {_printable(_some(moved))} changed while it was copied; "
            "fetch it again once it no longer changes"
        )


def _copy_local(
    folder: Path,
    dest: Path,
    allow_pickle: bool,
    trust_remote_code: bool,
    repo: Path | None = None,
) -> dict[str, str]:
    """Copy the wanted files of ``folder`` into ``dest``; each copied file's sha256."""
    tree = _Tree(folder, repo)
    _refuse(folder, tree.refusals(*_checkpoint_files(allow_pickle)))
    patterns = _patterns(allow_pickle, trust_remote_code)
    return {name: tree.copy(name, dest) for name in tree.names(*patterns)}


def _check_unchanged(
    where: Path | str,
    copied: dict[str, str],
    expected: dict,
    allow_pickle: bool,
    trust_remote_code: bool,
    what: str,
) -> None:
    """Refuse a copy that is not what ``expected`` (an identity) named: a file changed, added or
    removed in between (CheckpointChanged)."""
    named = {n: h for n, h in expected.items() if wanted(n, allow_pickle, trust_remote_code)}
    changed = [
        f"{name} ({what} differs)"
        for name in sorted(copied.keys() & named.keys())
        if copied[name] != named[name]
    ]
    changed += [f"{name} (added)" for name in sorted(copied.keys() - named.keys())]
    changed += [f"{name} (removed)" for name in sorted(named.keys() - copied.keys())]
    if changed:
        raise CheckpointChanged(
            f"checkpoint {where}: changed between its identity and its copy: "
            f"{_printable(_some(changed))}; fetch it again once it no longer changes"
        )
