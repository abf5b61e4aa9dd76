"""A content-addressed artifact store on any fsspec URL (local folder, ``s3://bucket/prefix``).

Every artifact lives under a key derived from the content hashes of its inputs, the config of
the stage that made it and that stage's code version, so a rerun with the same inputs finds it
and does no work, and a change anywhere upstream can never serve a stale result.

Layout of one artifact::

    <root>/<stage>/<digest>/MANIFEST.json        written last: the artifact exists iff it does
    <root>/<stage>/<digest>/<writer-id>/<files>  the data, one folder per writer

Writes never rename data: the files go to a fresh writer folder, then the manifest (the file
list with each file's sha256 and size) is written in one put. A reader trusts only manifests, and
checks every file's hash before using it, so an interrupted write leaves nothing that reads as
complete and a corrupted object is found, not used. Two writers of one key each leave a complete
folder; the first manifest stays, and the second writer removes its own copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
_CHUNK = 1 << 22


class ArtifactRef(BaseModel):
    """What stages pass each other: where an artifact is and what it must contain."""

    model_config = ConfigDict(frozen=True)

    key: str
    hash: str


class CorruptArtifact(RuntimeError):
    """An artifact whose files are missing or do not match their manifest's hashes."""


def default_store_url() -> str:
    """$UNLEARNING_AUDIT_STORE, else ./audit-store."""
    return os.environ.get("UNLEARNING_AUDIT_STORE") or str(Path("audit-store").resolve())


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, the form every hash is taken over."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"))


def digest(obj: Any) -> str:
    """sha256 hex of an object's canonical JSON."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def _plain(obj: Any) -> Any:
    if isinstance(obj, ArtifactRef):
        return obj.hash
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def file_sha256(path: Path) -> str:
    """sha256 hex of a local file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stream_sha256(f) -> str:
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


class Store:
    """An artifact store at ``url``; see the module docstring for the layout and guarantees."""

    def __init__(self, url: str | None = None, cache_dir: str | Path | None = None):
        self.url = url or default_store_url()
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self.local = "file" in _protocols(self.fs)
        self.cache_dir = Path(
            cache_dir
            or os.environ.get("UNLEARNING_AUDIT_CACHE")
            or Path.home() / ".cache" / "unlearning-audit"
        )
        self._verified: set[str] = set()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def check_writable(self) -> None:
        """Write and remove a probe object; raise ValueError naming the URL if that fails."""
        probe = self._path(".probe", uuid.uuid4().hex)
        try:
            if self.local:
                self.fs.makedirs(self._path(".probe"), exist_ok=True)
            self.fs.pipe(probe, b"ok")
            self.fs.rm(probe)
        except Exception as exc:
            raise ValueError(f"store URL {self.url!r} cannot be written: {exc}") from exc

    @staticmethod
    def key_for(stage: str, inputs: Mapping[str, Any], config: Any, version: str) -> str:
        """A stage artifact's key: the stage name and a digest of all it depends on."""
        return f"{stage}/{digest({'inputs': inputs, 'config': config, 'version': version})[:24]}"

    # -- reading ---------------------------------------------------------------------------

    def manifest(self, key: str) -> dict | None:
        """The artifact's manifest, or None where it has none (absent or incomplete)."""
        try:
            return json.loads(self.fs.cat_file(self._path(key, MANIFEST)))
        except FileNotFoundError:
            return None

    def get(self, key: str) -> ArtifactRef | None:
        """A reference to the artifact at ``key`` if it exists and verifies, else None.

        A corrupt artifact is reported with a warning and treated as absent, so the stage that
        asks recomputes it.
        """
        manifest = self.manifest(key)
        if manifest is None:
            return None
        ref = ArtifactRef(key=key, hash=manifest["hash"])
        try:
            self.verify(ref, manifest)
        except CorruptArtifact as exc:
            log.warning("ignoring corrupt artifact %s: %s", key, exc)
            return None
        return ref

    def verify(self, ref: ArtifactRef, manifest: dict | None = None) -> None:
        """Check every file of the artifact against its manifest; raise CorruptArtifact if not."""
        if ref.hash in self._verified:
            return
        manifest = manifest or self.manifest(ref.key)
        if manifest is None:
            raise CorruptArtifact(f"{ref.key}: no manifest")
        if manifest["hash"] != ref.hash:
            raise CorruptArtifact(f"{ref.key}: manifest names {manifest['hash']}, not {ref.hash}")
        if digest(manifest["files"]) != ref.hash:
            raise CorruptArtifact(f"{ref.key}: manifest file list does not match its hash")
        for name, entry in manifest["files"].items():
            path = self._path(ref.key, manifest["data"], name)
            try:
                with self.fs.open(path, "rb") as f:
                    actual = _stream_sha256(f)
            except FileNotFoundError as exc:
                raise CorruptArtifact(f"{ref.key}: {name} is missing") from exc
            if actual != entry["sha256"]:
                raise CorruptArtifact(f"{ref.key}: {name} does not match its sha256")
        self._verified.add(ref.hash)

    def local_dir(self, ref: ArtifactRef) -> Path:
        """A local folder holding the artifact's files, verified against the manifest.

        A local store gives its own folder; a remote one is downloaded once into the cache,
        keyed by content hash.
        """
        manifest = self.manifest(ref.key)
        self.verify(ref, manifest)
        if self.local:
            return Path(self._path(ref.key, manifest["data"]))
        target = self.cache_dir / ref.hash
        if not target.exists():
            tmp = Path(tempfile.mkdtemp(dir=_ensure(self.cache_dir), prefix=".part-"))
            for name, entry in manifest["files"].items():
                dest = tmp / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(self._path(ref.key, manifest["data"], name), str(dest))
                if file_sha256(dest) != entry["sha256"]:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise CorruptArtifact(f"{ref.key}: {name} changed while downloading")
            try:
                tmp.rename(target)
            except OSError:  # another process finished the same download first
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    def read_bytes(self, ref: ArtifactRef, name: str) -> bytes:
        """One file of a verified artifact."""
        manifest = self.manifest(ref.key)
        self.verify(ref, manifest)
        return self.fs.cat_file(self._path(ref.key, manifest["data"], name))

    def read_json(self, ref: ArtifactRef, name: str) -> Any:
        """One JSON file of a verified artifact."""
        return json.loads(self.read_bytes(ref, name))

    def open(self, ref: ArtifactRef, name: str):
        """A binary file object on one file of a verified artifact (for streaming reads)."""
        manifest = self.manifest(ref.key)
        self.verify(ref, manifest)
        return self.fs.open(self._path(ref.key, manifest["data"], name), "rb")

    def manifests(self, stage: str | None = None) -> Iterator[dict]:
        """Every manifest in the store, or those of one stage."""
        pattern = self._path(stage or "*", "*", MANIFEST)
        for path in sorted(self.fs.glob(pattern)):
            yield json.loads(self.fs.cat_file(path))

    # -- writing ---------------------------------------------------------------------------

    def put(self, key: str, src: Path, meta: Mapping[str, Any] | None = None) -> ArtifactRef:
        """Store the files under local folder ``src`` as the artifact ``key``; see module doc."""
        files = {p.relative_to(src).as_posix(): p for p in sorted(src.rglob("*")) if p.is_file()}
        entries = {
            name: {"sha256": file_sha256(p), "size": p.stat().st_size} for name, p in files.items()
        }
        writer = uuid.uuid4().hex[:12]
        for name, p in files.items():
            dest = self._path(key, writer, name)
            if self.local:
                self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(p), dest)
        ref = ArtifactRef(key=key, hash=digest(entries))
        existing = self.get(key)
        if existing is not None:  # another writer committed first: keep theirs
            self.fs.rm(self._path(key, writer), recursive=True)
            return existing
        manifest = {
            "key": key,
            "stage": key.split("/", 1)[0],
            "hash": ref.hash,
            "data": writer,
            "files": entries,
            "meta": dict(meta or {}),
            "created": datetime.now(timezone.utc).isoformat(),
        }
        self._write_atomic(self._path(key, MANIFEST), canonical_json(manifest).encode())
        return ref

    def _write_atomic(self, path: str, data: bytes) -> None:
        if self.local:  # a local rename is atomic; an object-store put is atomic by itself
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            self.fs.pipe(tmp, data)
            os.replace(tmp, path)
        else:
            self.fs.pipe(path, data)

    def cached(
        self,
        stage: str,
        inputs: Mapping[str, Any],
        config: Any,
        version: str,
        build: Callable[[Path], Mapping[str, Any] | None],
    ) -> tuple[ArtifactRef, bool]:
        """The stage's artifact from the store, or built by ``build(folder)`` and stored.

        ``build`` writes its files into the folder it is given and may return metadata for the
        manifest. Returns the reference and whether it was served from the store.
        """
        key = self.key_for(stage, inputs, config, version)
        ref = self.get(key)
        if ref is not None:
            return ref, True
        with tempfile.TemporaryDirectory(prefix=f"ua-{stage}-") as tmp:
            meta = build(Path(tmp)) or {}
            meta = {"inputs": _plain(inputs), "config": _plain(config), "version": version, **meta}
            return self.put(key, Path(tmp), meta), False


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def code_version(*modules) -> str:
    """A digest of the source of the modules a stage's result depends on.

    Part of every artifact key, so changed code never serves a result computed by the old code.
    """
    import inspect

    return digest([inspect.getsource(m) for m in modules])[:16]
