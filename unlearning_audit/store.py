"""A content-addressed artifact store on any fsspec URL (local folder, ``s3://bucket/prefix``).

Every artifact lives under a key derived from the content hashes of its inputs, the config of
the stage that made it and that stage's code version, so a rerun with the same inputs finds it
and does no work, and a change anywhere upstream can never serve a stale result.

Layout of one artifact::

    <root>/<stage>/<digest>/MANIFEST.json        written last: the artifact exists iff it does
    <root>/<stage>/<digest>/<writer-id>/<files>  the data, one folder per writer

Writes never rename data: the files go to a fresh writer folder, then the manifest (the file
list with each file's sha256 and size) is written in one put. A reader trusts only manifests, and
checks every file's hash before using it (a local file once per process while it stays
unchanged: remembered_sha256), so an interrupted write leaves nothing that reads as complete and
a corrupted object is found, not used. The manifest is created exclusively (a local
hard link, an S3 conditional PUT with If-None-Match), so of two writers of one key the first
manifest stays and the second writer removes its own copy; a manifest whose artifact fails
verification is replaced by the next writer. ``check_integrity`` hashes every artifact and lists
those that fail, and the writer folders killed writers left; ``repair`` removes them (the CLI's
``verify [--repair]``). Keys never leave the root: ``..`` parts and absolute paths are refused,
and so are keys too long for S3 or a file system (over 1024 bytes in UTF-8, or a part over 255).

A manifest names its own key and stage, and the inputs, config and code version its key was
derived from (``cached`` records them; ``put`` refuses a meta without them). A manifest is
refused as corrupt, so the stage that needs it recomputes it and ``verify`` lists it, where the
key it names is not the key it is stored under, where its stage differs, or where its inputs,
config and version are missing or do not derive that key: an artifact moved, copied or swapped
to another key is caught, even with its ``key`` field edited to match its new place. A local
artifact is read as its data folder, so a file there that its manifest does not name makes it
corrupt too. A manifest nested too deeply to parse or to derive a key from is corrupt, not a
crash.

What this does not guarantee. The store signs nothing: the hashes prove that files match their
manifest and that a manifest belongs to its key, not who wrote them. Anyone who can write to a
shared store can still write wrong content, with a matching manifest, under a correct key; the
manifest's ``created`` time and the rest of its ``meta`` (provenance, summaries, the audit's name)
are covered by no hash at all. So nothing that decides what an audit does or trusts is read from
a manifest: whether a checkpoint may run its own model code, for one, comes only from the
current run's parameters. Give write access only to those whose results you would accept.

A remote store (``s3://bucket/prefix``; endpoint, region and credentials come from the usual AWS
environment variables or an AWS profile) is read through a local cache keyed by content hash:
verifying an artifact downloads it once, hashing as it goes, and every later read on this machine
is local. Transient errors (connection refused, timeouts) are retried with backoff, a bounded
number of times. Credentials never appear in a URL: a URL that holds them
(``s3://KEY:SECRET@bucket``, ``https://token@host``, ``?X-Amz-Signature=...``) is refused
(``check_url``). The store's own exceptions (CorruptArtifact, StoreUnavailable, and the
ValueErrors naming its URL) and its log lines pass through ``redact``, and a cause whose text
holds a credential is not chained to them. Errors of the filesystem that no retry cures (a
missing object, access denied) propagate as the filesystem raised them, unredacted, for callers
to tell apart; the command line prints every message, and under ``--debug`` every traceback,
through ``redact``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Literal, TypeVar
from urllib.parse import unquote

import fsspec
from pydantic import BaseModel, ConfigDict

from . import scratch

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
_CHUNK = 1 << 22
# A name (of an environment variable, storage option or URL query parameter) whose value is a
# credential: AWS_SECRET_ACCESS_KEY, HF_TOKEN, X-Amz-Signature, an Azure SAS ``sig``...
_SECRET_NAME = re.compile(
    r"token|secret|passw|key|credential|signature|cookie|auth(?!or)|^sig$", re.IGNORECASE
)
_MIN_SECRET = 8  # characters: shorter values under secret names are too common to mask
_NAMED_USER = ("abfs", "abfss", "az", "adl", "wasb", "wasbs")  # user part: a container's name
_MAX_DELAY = 60.0  # seconds between two attempts, at most
_WRITER = re.compile(r"^[0-9a-f]{12}$")  # a writer folder's name: put's uuid4().hex[:12]
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
_MAX_KEY = 1024  # bytes in a key, at most (S3's limit on a whole object key)
_MAX_PART = 255  # bytes in one part of a key, at most (a file name on common file systems)
# A URL in free text, up to the first whitespace; a query parameter in it; a bearer token; a
# Hugging Face token. Each match is bounded or consumes what it scans: the search is linear.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]{0,31}://\S*")
_PARAM = re.compile(r"([?&#])([^=&#?\s]{1,128})=([^&#?\s]+)")
_BEARER = re.compile(r"(?i)\b(bearer\s+)\S+")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
_DERIVATION = ("inputs", "config", "version")  # what Store.cached records of a key's origin
T = TypeVar("T")


class ArtifactRef(BaseModel):
    """What stages pass each other: where an artifact is and what it must contain."""

    model_config = ConfigDict(frozen=True)

    key: str
    hash: str


class _Redacted(RuntimeError):
    """An error whose message never holds a credential (see redact)."""

    def __init__(self, message: object = "") -> None:
        super().__init__(redact(str(message)))


class CorruptArtifact(_Redacted):
    """An artifact whose files are missing or do not match their manifest's hashes, or whose
    manifest does not belong to the key it is stored under."""


class StoreUnavailable(_Redacted):
    """The store could not be reached, even after every retry."""


@dataclass(frozen=True)
class Finding:
    """One problem check_integrity found, and what repair removes for it (paths under the root).

    ``corrupt``: an artifact that does not verify (its manifest, then its data folder, go);
    ``orphan``: a writer folder (or a manifest's temporary file) that no manifest names.
    """

    kind: Literal["corrupt", "orphan"]
    key: str
    problem: str
    remove: tuple[str, ...]


def check_key(key: str) -> str:
    """``key`` if it is a relative path that stays inside the store, else a ValueError saying why.

    Keys and audit names come from users too (``show``, ``report``, ``--name``): ``../x`` or an
    absolute path would read or write outside the store's root.
    """
    parts = key.replace("\\", "/").split("/")
    if not key or key.startswith(("/", "\\", "~")) or _DRIVE.match(key):
        raise ValueError(f"{key!r} is empty or an absolute path; give a path inside the store")
    if len(key.encode()) > _MAX_KEY or any(len(part.encode()) > _MAX_PART for part in parts):
        raise ValueError(
            f"{key[:40]!r}... is too long ({len(key.encode())} bytes in UTF-8): a key has at most "
            f"{_MAX_KEY} bytes, and at most {_MAX_PART} between two '/'"
        )
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{key!r} has an empty, '.' or '..' part, which could leave the store")
    if any(ord(c) < 32 for c in key):
        raise ValueError(f"{key!r} holds a control character")
    return key


def default_store_url() -> str:
    """$UNLEARNING_AUDIT_STORE, else ./audit-store."""
    return os.environ.get("UNLEARNING_AUDIT_STORE") or str(Path("audit-store").resolve())


def endpoint_url() -> str | None:
    """The S3 endpoint of this environment: $AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None):
    """The fsspec filesystem and path of ``url``.

    An S3 URL gets the environment's endpoint explicitly: botocore reads it too, but fsspec caches
    filesystems by their arguments, and an explicit endpoint keeps two endpoints apart. Region
    and credentials stay botocore's business (environment, profile, instance role), so they never
    sit in the filesystem's arguments, where they could be pickled or logged; a URL, endpoint or
    storage option that holds credentials is refused (check_url).
    """
    check_url(url, "URL")
    options = dict(storage_options or {})
    _check_option_urls(options)
    endpoint = endpoint_url()
    if url.split("://", 1)[0] in ("s3", "s3a") and endpoint:
        check_url(endpoint, "the S3 endpoint ($AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL)")
        options.setdefault("endpoint_url", endpoint)
    return fsspec.core.url_to_fs(url, **options)


def check_url(url: str, what: str) -> str:
    """``url``, unless it holds credentials: then a ValueError naming ``what``, with the URL
    redacted. Credentials are a password (``scheme://user:password@host``, any scheme), a user
    part (``https://token@host``; except for the Azure schemes, where it names a container:
    ``abfs://container@account``) and the value of a query parameter with a secret's name
    (``?X-Amz-Signature=``, ``?sig=``, ``?access_token=``); see _mask_url.

    A URL is kept in Prefect's database (flow run parameters), in logs and in tracebacks, so a
    secret in it would leak everywhere; credentials belong in the environment or a profile.
    """
    masked = _mask_url(url)
    if masked != url:
        raise ValueError(
            f"{what} {redact(masked)!r} holds credentials; give them through the environment "
            "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the service's own variables) or an "
            "AWS profile (AWS_PROFILE), never in the URL"
        )
    return url


def _mask_url(url: str) -> str:
    """``url`` with its credentials (see check_url) as ***: the whole userinfo, up to its last
    '@', and each secret query value. Not a URL (no ``://``): ``url`` as it is."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = _userinfo_end(scheme, rest)
    return f"{scheme}://{'***@' if end else ''}{_PARAM.sub(_mask_param, rest[end:])}"


def _userinfo_end(scheme: str, rest: str) -> int:
    """Where the userinfo of a URL that holds a credential ends in ``rest`` (the URL after its
    ``scheme://``): just past its last '@'; 0 where it holds none.

    The userinfo runs to the last '@' before the host ends (at the first '/', '?' or '#' after
    the first '@'), so a password may hold '@', '/' (raw AWS secrets do), quotes, backslashes
    (and, in a URL checked on its own, spaces). ``urlsplit`` ends the host at the first '/', so
    it reads ``s3://KEY:a/b@bucket`` as host ``KEY`` on port ``a``; here a ':' before the first
    '@' starts a password whatever follows, so ``http://host:9000/path@v1`` reads as one too
    (refused and masked, never leaked). A user part holding '/', '?' or '#' is a path, a query
    or a fragment (``s3://bucket/x@v1``).
    """
    first = rest.find("@")
    user, colon, _ = rest[: max(first, 0)].partition(":")
    if first < 0 or any(c in user for c in "/?#"):
        return 0
    if not colon and scheme.lower() in _NAMED_USER:
        return 0
    host_end = min((i for c in "/?#" if (i := rest.find(c, first)) >= 0), default=len(rest))
    return rest.rfind("@", 0, host_end) + 1


def _mask_param(match: re.Match[str]) -> str:
    """A query parameter (``_PARAM``) with its value as *** where its name is a secret's."""
    sep, name, _ = match.groups()
    return f"{sep}{name}=***" if _SECRET_NAME.search(unquote(name)) else match.group()


def _check_option_urls(options: Mapping[str, Any], where: str = "storage option") -> None:
    """check_url on every string value of the storage options (e.g. an endpoint_url), nested too."""
    for name, value in options.items():
        if isinstance(value, Mapping):
            _check_option_urls(value, f"{where} {name}:")
        elif isinstance(value, str):
            check_url(value, f"{where} {name}")


def redact(text: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """``text`` with every credential in it as ***: the value of each environment variable and
    storage option with a secret's name (holding TOKEN, SECRET, PASSW, KEY, CREDENTIAL...:
    AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, HF_TOKEN) of at least 8 characters; in each URL,
    the userinfo and secret query values (see check_url); bearer tokens; Hugging Face tokens
    (``hf_...``, wherever they came from). The one masking function of the package."""
    named = [v for k, v in os.environ.items() if _SECRET_NAME.search(k)]
    secrets = {s for s in named + _secrets(storage_options) if len(s) >= _MIN_SECRET}
    for secret in sorted(secrets, key=len, reverse=True):  # a longer one may hold a shorter one
        text = text.replace(secret, "***")
    text = _URL.sub(lambda m: _mask_url(m.group()), text)
    text = _BEARER.sub(r"\1***", text)
    return _HF_TOKEN.sub("hf_***", text)


def _cause(exc: BaseException, storage_options: Mapping[str, Any] | None = None):
    """``exc`` to chain a store error to (``raise ... from``), or None where its own text holds
    a credential: a chained cause is printed with every traceback."""
    text = f"{type(exc).__name__}: {exc}"
    return exc if redact(text, storage_options) == text else None


def _secrets(options: Mapping[str, Any] | None) -> list[str]:
    """String values under secret names (see _SECRET_NAME), nested too."""
    found = []
    for name, value in (options or {}).items():
        if isinstance(value, Mapping):
            found += _secrets(value)
        elif isinstance(value, str) and _SECRET_NAME.search(name):
            found.append(value)
    return found


@functools.cache
def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors a retry can cure: connections refused or dropped, timeouts (builtin and botocore)."""
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:
        return (ConnectionError, TimeoutError)
    return (ConnectionError, TimeoutError, BotoConnectionError, HTTPClientError)


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
    with open(path, "rb") as f:
        return _stream_sha256(f)


_HASHED: dict[tuple, str] = {}
"""sha256 of local files this process hashed, by path and what a change to the file would
change: inode, size, modification and status-change times (no call sets ctime back)."""
_HASHED_LOCK = threading.Lock()


def remembered_sha256(path: str) -> str:
    """sha256 of a local file, hashed once per process while it stays unchanged: every stage
    of an audit verifies the checkpoints it reads, and a 7B checkpoint is 15 GB of reading."""
    info = os.stat(path)
    state = (path, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    with _HASHED_LOCK:
        known = _HASHED.get(state)
    if known is None:
        known = file_sha256(Path(path))
        with _HASHED_LOCK:
            _HASHED[state] = known
    return known


def _stream_sha256(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, from its ``st_mode``, for messages that refuse
    it (a FIFO would block its reader forever, a device could be endless)."""
    for test, kind in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return kind
    return "not a file"


def _check_manifest(ref: ArtifactRef, manifest: dict | None) -> dict:
    """The manifest, if it exists and names exactly the content ``ref`` expects."""
    if manifest is None:
        raise CorruptArtifact(f"{ref.key}: no manifest")
    if manifest["hash"] != ref.hash:
        raise CorruptArtifact(f"{ref.key}: manifest names {manifest['hash']}, not {ref.hash}")
    if digest(manifest["files"]) != ref.hash:
        raise CorruptArtifact(f"{ref.key}: manifest file list does not match its hash")
    return manifest


def _check_location(key: str, manifest: dict) -> None:
    """Raise CorruptArtifact unless the manifest belongs where it lies: the key and stage it
    names are ``key``'s, and the inputs, config and code version of its stage that it records
    derive ``key``. An artifact copied, moved or swapped to another key fails here, with its
    ``key`` field edited to match or not, and with its derivation edited or removed."""
    named, stage = manifest["key"], key.split("/", 1)[0]
    if named != key:
        raise CorruptArtifact(f"{key}: {MANIFEST} is stored under {key} but names {named}")
    if manifest["stage"] != stage:
        raise CorruptArtifact(
            f"{key}: {MANIFEST} is stored under stage {stage} but names stage {manifest['stage']}"
        )
    if problem := _derivation_problem(key, manifest["meta"]):
        raise CorruptArtifact(f"{key}: {MANIFEST} is stored under {key} but {problem}")


def _derivation_problem(key: str, meta: Mapping[str, Any]) -> str | None:
    """Why ``meta`` does not derive ``key`` (it lacks the inputs, config or version of the key's
    stage, or they give another key), or None where it does. Every artifact comes from
    Store.cached, which records them; put refuses a meta without them."""
    if missing := [name for name in _DERIVATION if name not in meta]:
        return f"its meta does not record its {', '.join(missing)}"
    stage = key.split("/", 1)[0]
    try:
        derived = Store.key_for(stage, meta["inputs"], meta["config"], meta["version"])
    except RecursionError:
        return "its inputs, config and version are nested too deeply to derive a key from"
    if derived != key:
        return f"its inputs, config and version give {derived}"
    return None


def _is_entry(entry: Any) -> bool:
    """Whether a manifest's file entry is what put writes: a sha256 and a size, nothing else."""
    return (
        isinstance(entry, dict)
        and entry.keys() == {"sha256", "size"}
        and isinstance(entry["sha256"], str)
        and type(entry["size"]) is int
    )


def _expect_sha256(key: str, name: str, entry: dict, actual: str) -> None:
    if actual != entry["sha256"]:
        raise CorruptArtifact(f"{key}: {name} does not match its sha256")


class Store:
    """An artifact store at ``url``; see the module docstring for the layout and guarantees.

    Tuning from the environment: UNLEARNING_AUDIT_CACHE (the local cache of remote artifacts),
    UNLEARNING_AUDIT_STORE_RETRIES (attempts per operation, default 4),
    UNLEARNING_AUDIT_STORE_BACKOFF (first retry delay in seconds, doubling up to a minute,
    default 1) and UNLEARNING_AUDIT_PART_SIZE_MB (S3 multipart part size, for uploads and
    ranged downloads; default s3fs's 50 MiB). Parallel parts: the storage option
    ``max_concurrency`` (s3fs, default 10), or FSSPEC_S3_MAX_CONCURRENCY.
    """

    def __init__(
        self,
        url: str | None = None,
        cache_dir: str | Path | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ):
        self.url = check_url(url or default_store_url(), "store URL")
        self._options = dict(storage_options or {})
        self.fs, root = filesystem(self.url, self._options)
        self.root = root.rstrip("/")
        self.local = "file" in _protocols(self.fs)
        self.cache_dir = Path(cache_dir) if cache_dir else scratch.cache_dir()
        self.retries = max(1, int(os.environ.get("UNLEARNING_AUDIT_STORE_RETRIES", "4")))
        self.backoff = float(os.environ.get("UNLEARNING_AUDIT_STORE_BACKOFF", "1"))
        part_mb = os.environ.get("UNLEARNING_AUDIT_PART_SIZE_MB")
        self.part_size = int(float(part_mb) * 2**20) if part_mb else None
        self._verified: set[tuple[str, str, str]] = set()  # (key, data folder, hash)

    def __repr__(self) -> str:
        return f"Store({self._redact(self.url)!r})"

    def _redact(self, text: str) -> str:
        return redact(text, self._options)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, retried with exponential backoff while it fails with a transient error.

        Raises StoreUnavailable, naming the operation, once every attempt has failed, redacted
        and chained to its cause only where the cause's text holds no credential. Any other
        error propagates unchanged (callers tell FileNotFoundError apart): see the module doc.
        """
        attempt = 1
        while True:
            try:
                return call()
            except _transient_errors() as exc:
                reason = self._redact(f"{type(exc).__name__}: {exc}")
                if attempt >= self.retries:
                    raise StoreUnavailable(
                        self._redact(
                            f"store {self.url}: {what} failed after {attempt} attempts ({reason})"
                        )
                    ) from _cause(exc, self._options)
                delay = min(self.backoff * 2 ** (attempt - 1), _MAX_DELAY)
                log.warning(
                    "store %s: %s failed (%s); retry %d of %d in %.1fs",
                    self._redact(self.url),
                    self._redact(what),
                    reason,
                    attempt,
                    self.retries - 1,
                    delay,
                )
                time.sleep(delay)
                attempt += 1

    def check_writable(self) -> None:
        """Write and remove a probe object; raise ValueError naming the URL if that fails."""
        probe = self._path(".probe", uuid.uuid4().hex)
        try:
            if self.local:
                self.fs.makedirs(self._path(".probe"), exist_ok=True)
            self.fs.pipe(probe, b"ok")
            self.fs.rm(probe)
        except Exception as exc:
            raise ValueError(
                self._redact(f"store URL {self.url!r} cannot be written: {exc}")
            ) from _cause(exc, self._options)

    def check_readable(self) -> None:
        """Raise ValueError naming the URL unless the store's root exists and can be listed.

        A local root must be a folder. On S3, a bucket with nothing under the prefix does not
        exist either (S3 has no empty folders): a mistyped prefix, or a store no audit has
        written to yet. Connection failures are retried first (see _retry).
        """
        where = f"store URL {self.url!r}"
        self.fs.invalidate_cache()
        try:
            if self.local and self.fs.exists(self.root) and not self.fs.isdir(self.root):
                raise ValueError(self._redact(f"{where} is a file, not a folder"))
            self._retry("listing of the store's root", lambda: self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            raise ValueError(self._redact(f"{where} does not exist ({self._missing()})")) from None
        except ValueError:
            raise
        except Exception as exc:  # access denied, unreachable after every retry, bad endpoint
            problem = f"{type(exc).__name__}: {exc}"
            raise ValueError(self._redact(f"{where} cannot be read ({problem})")) from _cause(
                exc, self._options
            )

    def _missing(self) -> str:
        """What is missing of a root that cannot be found: the folder, the bucket or the prefix."""
        if self.local:
            return "no such folder"
        bucket = self.root.split("/", 1)[0]
        try:
            bucket_exists = bucket != self.root and self.fs.exists(bucket)
        except Exception:  # for the message only: the listing has failed already
            bucket_exists = False
        if bucket_exists:
            return f"nothing is stored under {self.root!r}: a mistyped prefix, or no audit yet"
        return f"no bucket {bucket!r}, or no access to it"

    @staticmethod
    def key_for(stage: str, inputs: Mapping[str, Any], config: Any, version: str) -> str:
        """A stage artifact's key: the stage name and a digest of all it depends on."""
        return f"{stage}/{digest({'inputs': inputs, 'config': config, 'version': version})[:24]}"

    # -- reading ---------------------------------------------------------------------------

    def manifest(self, key: str) -> dict | None:
        """The artifact's manifest, or None where it has none (absent or incomplete).

        A manifest that is not a JSON object with a hash, a data folder, a file list (each
        file's sha256 and size), its key, stage, creation time and meta raises CorruptArtifact;
        so does one that does not belong to ``key`` (see _check_location). A key that would
        leave the store raises ValueError (see check_key).
        """
        manifest = self._parsed_manifest(key)
        if manifest is not None:
            _check_location(key, manifest)
        return manifest

    def _parsed_manifest(self, key: str) -> dict | None:
        """The manifest stored under ``key`` if it is well formed, wherever it belongs."""
        path = self._path(check_key(key), MANIFEST)
        try:
            raw = self._retry(f"read of {key}/{MANIFEST}", lambda: self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        try:
            manifest = json.loads(raw)
            fields = ("key", "stage", "hash", "data", "created")
            valid = all(isinstance(manifest[f], str) for f in fields) and manifest["hash"]
            valid = valid and isinstance(manifest["meta"], dict)
            valid = valid and isinstance(manifest["files"], dict)
            valid = valid and all(_is_entry(entry) for entry in manifest["files"].values())
            # the data folder and file names must stay inside the artifact: a tampered manifest
            # in a shared bucket must not read or write outside the store or the local cache
            valid = valid and _WRITER.match(manifest["data"])
            for name in manifest["files"] if valid else ():
                check_key(name)
        except (ValueError, KeyError, TypeError, RecursionError):  # or nested too deeply
            valid = False
        if not valid:
            raise CorruptArtifact(f"{key}: {MANIFEST} is not a valid manifest")
        return manifest

    def get(self, key: str) -> ArtifactRef | None:
        """A reference to the artifact at ``key`` if it exists and verifies, else None.

        A corrupt artifact is reported with a warning and treated as absent, so the stage that
        asks recomputes it.
        """
        try:
            manifest = self.manifest(key)
            if manifest is None:
                return None
            ref = ArtifactRef(key=key, hash=manifest["hash"])
            self.verify(ref, manifest)
        except CorruptArtifact as exc:
            log.warning("ignoring corrupt artifact: %s", exc)
            return None
        return ref

    def verify(self, ref: ArtifactRef, manifest: dict | None = None) -> None:
        """Check every file of the artifact against its manifest; raise CorruptArtifact if not.

        A remote artifact is verified by downloading it into the local cache (see local_dir). An
        artifact is verified once per process: its key, data folder and hash are remembered, so
        another key whose manifest names the same hash has its own files checked.
        """
        manifest = _check_manifest(ref, manifest or self.manifest(ref.key))
        seen = (ref.key, manifest["data"], ref.hash)
        if seen in self._verified:
            return
        if self.local:
            self._check_files(ref.key, manifest, remembered=True)
        else:
            self._cached_copy(ref, manifest)
        self._verified.add(seen)

    def _check_files(self, key: str, manifest: dict, remembered: bool = False) -> None:
        """Hash every file of an artifact where it lies (a remote one streamed, never cached;
        with ``remembered``, a local file this process hashed and that has not changed since is
        not read again: see remembered_sha256); raise CorruptArtifact where its data folder
        holds a file the manifest does not name (a local artifact is read as its folder: an
        added chat_template.jinja would change the prompts), or at the first file that is
        missing or differs from its manifest."""
        digest_of = remembered_sha256 if remembered and self.local else self._sha256
        folder = self._path(key, manifest["data"])
        listed = self._retry(f"listing of {key}/{manifest['data']}", lambda: self.fs.find(folder))
        if extra := sorted({p[len(folder) + 1 :] for p in listed} - manifest["files"].keys()):
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise CorruptArtifact(f"{key}: holds files its manifest does not name: {shown}")
        for name, entry in manifest["files"].items():
            path = self._path(key, manifest["data"], name)
            try:
                actual = self._retry(f"read of {key}/{name}", lambda p=path: digest_of(p))
            except FileNotFoundError as exc:
                raise CorruptArtifact(f"{key}: {name} is missing") from exc
            _expect_sha256(key, name, entry, actual)

    def _sha256(self, path: str) -> str:
        with self.fs.open(path, "rb") as f:
            return _stream_sha256(f)

    def local_dir(self, ref: ArtifactRef) -> Path:
        """A local folder holding the artifact's files, verified against the manifest.

        A local store gives its own folder; a remote one is downloaded once into the cache,
        keyed by content hash, so every later read on this machine is local.
        """
        manifest = self.manifest(ref.key)
        self.verify(ref, manifest)
        manifest = _check_manifest(ref, manifest)
        if self.local:
            return Path(self._path(ref.key, manifest["data"]))
        return self._cached_copy(ref, manifest)

    def _cached_copy(self, ref: ArtifactRef, manifest: dict) -> Path:
        """The cache folder of a remote artifact, downloaded and hashed file by file if absent."""
        target = self.cache_dir / ref.hash
        if target.exists():
            return target
        tmp = scratch.mkdtemp(self.cache_dir)
        try:
            for name, entry in manifest["files"].items():
                dest = tmp / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = self._path(ref.key, manifest["data"], name)
                try:
                    self._retry(
                        f"download of {ref.key}/{name}",
                        functools.partial(self.fs.get_file, src, str(dest), **self._parts()),
                    )
                except FileNotFoundError as exc:
                    raise CorruptArtifact(f"{ref.key}: {name} is missing") from exc
                _expect_sha256(ref.key, name, entry, file_sha256(dest))
            _publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def read_bytes(self, ref: ArtifactRef, name: str) -> bytes:
        """One file of a verified artifact."""
        return (self.local_dir(ref) / name).read_bytes()

    def read_json(self, ref: ArtifactRef, name: str) -> Any:
        """One JSON file of a verified artifact."""
        return json.loads(self.read_bytes(ref, name))

    def open(self, ref: ArtifactRef, name: str) -> IO[bytes]:
        """A binary file object on one file of a verified artifact (for streaming reads)."""
        return open(self.local_dir(ref) / name, "rb")

    def manifests(self, stage: str | None = None) -> Iterator[dict]:
        """Every readable manifest in the store, or those of one stage, freshly listed.

        A root that does not exist or cannot be listed raises check_readable's ValueError (a
        listing would otherwise read as an empty store)."""
        self.fs.invalidate_cache()
        pattern = self._path(stage or "*", "*", MANIFEST)
        paths = self._listed(lambda: self.fs.glob(pattern))
        for path in sorted(paths):
            key = path[len(self.root) + 1 : -len(MANIFEST) - 1]
            try:
                manifest = self.manifest(key)
            except CorruptArtifact as exc:
                log.warning("skipping %s", exc)
                continue
            if manifest is not None:
                yield manifest

    # -- integrity ---------------------------------------------------------------------------

    def clean_stale_builds(self) -> list[Path]:
        """Remove the build folders that killed runs left in a local store's key folders
        (Store.cached builds there); a live run's are kept. Returns them."""
        root = Path(self.root)
        if not self.local or not root.is_dir():
            return []
        keys = [key for stage in _subfolders(root) for key in _subfolders(stage)]
        return scratch.clean_stale(keys)

    def check_integrity(self, orphan_age: float = 3600.0) -> list[Finding]:
        """Every artifact whose manifest or files do not verify, and every writer folder that no
        manifest names and that nothing has written to for ``orphan_age`` seconds.

        Each artifact's files are hashed where they lie, so a copy this machine verified before
        (in the cache, or earlier in this process) hides nothing; a manifest stored under
        another key than its own is corrupt too (see _check_location). Orphans are what killed
        or failed writers leave; younger ones may belong to a writer still at work, so they are
        left alone. A root that does not exist or cannot be listed raises ValueError
        (check_readable), never an empty list.
        """
        findings: list[Finding] = []
        for key, (files, writers) in sorted(self._layout().items()):
            named = None
            if MANIFEST in files:
                try:
                    named = self._checked(key)["data"]
                except CorruptArtifact as exc:
                    manifest = self._readable_manifest(key)
                    named = manifest and manifest["data"]
                    remove = (f"{key}/{MANIFEST}",) + ((f"{key}/{named}",) if named else ())
                    findings.append(Finding("corrupt", key, str(exc), remove))
            leftovers = {**{n: t for n, t in files.items() if _is_tmp(n)}, **writers}
            for name, written in sorted(leftovers.items()):
                minutes = (time.time() - written) / 60
                if self.local and scratch.in_use(self._path(key, name)):
                    continue  # a build at work (Store.cached), however long it takes
                if name != named and minutes * 60 >= orphan_age:
                    problem = f"{key}/{name}: no manifest names it; untouched for {minutes:.0f} min"
                    findings.append(Finding("orphan", key, problem, (f"{key}/{name}",)))
        return findings

    def repair(self, findings: Iterable[Finding]) -> list[str]:
        """Remove what each finding names, a bad artifact's manifest before its data (so it stops
        existing at once, and the next run that needs it recomputes it); return the paths.

        An artifact that verifies again by now (another writer replaced it) is left alone.
        """
        removed = []
        for finding in findings:
            if finding.kind == "corrupt" and self._intact(finding.key):
                continue
            for rel in finding.remove:
                path = self._path(rel)
                with contextlib.suppress(FileNotFoundError):
                    self._retry(f"removal of {rel}", lambda p=path: self.fs.rm(p, recursive=True))
                    removed.append(rel)
        return removed

    def _layout(self) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
        """Per key folder (``<stage>/<digest>``): its own files and its writer folders, each with
        the time it was last written, from one recursive listing."""
        self.fs.invalidate_cache()
        listing = self._listed(lambda: self.fs.find(self.root, detail=True))
        layout: dict[str, tuple[dict[str, float], dict[str, float]]] = {}
        for path, info in listing.items():
            parts = path[len(self.root) + 1 :].split("/")
            if len(parts) < 3 or parts[0].startswith("."):
                continue  # not inside a key folder: the write probe, Prefect results
            files, writers = layout.setdefault("/".join(parts[:2]), ({}, {}))
            if len(parts) == 3:
                files[parts[2]] = _mtime(info)
            elif _WRITER.match(parts[2]):
                writers[parts[2]] = max(writers.get(parts[2], 0.0), _mtime(info))
        return layout

    def _listed(self, call: Callable[[], T]) -> T:
        """A listing of the store; where it finds nothing or fails for want of the root, the
        ValueError of check_readable, so that a missing store never reads as an empty one."""
        try:
            found = self._retry("listing", call)
        except (FileNotFoundError, PermissionError):
            self.check_readable()
            raise
        if not found:
            self.check_readable()
        return found

    def _checked(self, key: str) -> dict:
        """The artifact's manifest once it and every file it names verify, else CorruptArtifact."""
        manifest = self.manifest(key)
        if manifest is None:
            raise CorruptArtifact(f"{key}: no manifest")
        _check_manifest(ArtifactRef(key=key, hash=manifest["hash"]), manifest)
        self._check_files(key, manifest)
        return manifest

    def _intact(self, key: str) -> bool:
        """Whether the artifact at ``key`` exists and verifies now."""
        try:
            self._checked(key)
        except CorruptArtifact:
            return False
        return True

    # -- writing ---------------------------------------------------------------------------

    def put(
        self, key: str, src: Path, meta: Mapping[str, Any] | None = None, move: bool = False
    ) -> ArtifactRef:
        """Store the files under local folder ``src`` as the artifact ``key``; see module doc.
        With ``move`` (a build's own folder, on a local store's filesystem) the files are moved
        into place rather than copied: a 7B checkpoint is written once, not twice.

        ``meta`` must record the inputs, config and version that derive ``key`` (Store.key_for),
        else a ValueError: a manifest without them could not be told from one stripped of them
        to pass for another key's. Store.cached records them.
        """
        check_key(key)
        if problem := _derivation_problem(key, meta or {}):
            raise ValueError(f"{key} cannot be stored: {problem}")
        files = {p.relative_to(src).as_posix(): p for p in sorted(src.rglob("*")) if p.is_file()}
        entries = {
            name: {"sha256": file_sha256(p), "size": p.stat().st_size} for name, p in files.items()
        }
        ref = ArtifactRef(key=key, hash=digest(entries))
        writer = uuid.uuid4().hex[:12]
        self._upload(key, writer, files, move)
        manifest = {
            "key": key,
            "stage": key.split("/", 1)[0],
            "hash": ref.hash,
            "data": writer,
            "files": entries,
            "meta": dict(meta or {}),
            "created": datetime.now(timezone.utc).isoformat(),
        }
        data = canonical_json(manifest).encode()
        path = self._path(key, MANIFEST)
        if not self._retry(f"commit of {key}", lambda: self._write_atomic(path, data)):
            current = self._readable_manifest(key)
            if current is not None and current["data"] == writer:
                pass  # our own commit, whose reply was lost and retried
            elif (existing := self.get(key)) is not None:  # another writer committed first
                self._remove(key, writer)
                return existing
            else:
                log.warning("replacing corrupt artifact %s with a fresh copy", key)
                self._retry(f"commit of {key}", lambda: self._overwrite(path, data))
                if current is not None:
                    self._remove(key, current["data"])
        self._remember(src, ref)
        return ref

    def _upload(self, key: str, writer: str, files: Mapping[str, Path], move: bool) -> None:
        """Upload every file into the writer's folder (on a local store, with ``move``, move it
        there where it lies on the same filesystem); on failure, try to remove what was sent."""
        try:
            for name, p in files.items():
                dest = self._path(key, writer, name)
                if self.local:
                    self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
                    if move and _moved(p, dest):
                        continue
                self._retry(
                    f"upload of {key}/{writer}/{name}",
                    functools.partial(self.fs.put_file, str(p), dest, **self._parts()),
                )
        except BaseException:
            self._remove(key, writer)
            raise

    def _parts(self) -> dict[str, int]:
        """Transfer options of a remote store: parts of part_size, sent or fetched in parallel
        (up to the filesystem's max_concurrency, a storage option)."""
        return {} if self.local or self.part_size is None else {"chunksize": self.part_size}

    def _readable_manifest(self, key: str) -> dict | None:
        """The well-formed manifest stored under ``key``, even one that belongs elsewhere (to
        find its data folder), else None."""
        try:
            return self._parsed_manifest(key)
        except CorruptArtifact:
            return None

    def _remove(self, key: str, writer: str) -> None:
        """Remove one writer's data folder, best effort: an orphan folder is never read."""
        try:
            self.fs.rm(self._path(key, writer), recursive=True)
        except Exception as exc:
            log.debug("could not remove %s/%s: %s", key, writer, self._redact(str(exc)))

    def _remember(self, src: Path, ref: ArtifactRef) -> None:
        """Keep a copy of a remote artifact just written in the cache: this machine has it."""
        if self.local or (self.cache_dir / ref.hash).exists():
            return
        tmp = scratch.mkdtemp(self.cache_dir)
        try:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            _publish(tmp, self.cache_dir / ref.hash)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _write_atomic(self, path: str, data: bytes) -> bool:
        """Create ``path`` holding ``data`` in one step unless it exists; False if it did.

        Local: a hard link of a complete temporary file. S3: a PUT with If-None-Match.
        """
        try:
            if self.local:
                tmp = self._local_tmp(path, data)
                try:
                    os.link(tmp, path)
                finally:
                    os.unlink(tmp)
            else:
                self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def _overwrite(self, path: str, data: bytes) -> None:
        """Replace ``path`` with ``data`` in one step."""
        if self.local:
            os.replace(self._local_tmp(path, data), path)
        else:
            self.fs.pipe_file(path, data)

    def _local_tmp(self, path: str, data: bytes) -> str:
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe(tmp, data)
        return tmp

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
        # a local store's build lies beside its writer folders, so its files move into place;
        # one a kill leaves goes when the key is built again, or as an orphan (`repair`)
        parent = self._path(key) if self.local else None
        if parent is not None:
            self.fs.makedirs(parent, exist_ok=True)
            scratch.clean_stale([parent])  # the build of this key a killed run left
        with scratch.folder(stage, parent) as tmp:
            meta = build(Path(tmp)) or {}
            meta = {"inputs": _plain(inputs), "config": _plain(config), "version": version, **meta}
            return self.put(key, Path(tmp), meta, move=parent is not None), False


def _subfolders(folder: Path) -> list[Path]:
    """The folders directly in ``folder`` (not through links)."""
    return [Path(e.path) for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]


def _moved(src: Path, dest: str) -> bool:
    """Move ``src`` to ``dest`` if both lie on one filesystem (a rename); False where not."""
    try:
        os.replace(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        return False
    return True


def _is_tmp(name: str) -> bool:
    """A local manifest's temporary file (see _local_tmp), left behind by a killed writer."""
    return name.startswith(f"{MANIFEST}.") and name.endswith(".tmp")


def _mtime(info: Mapping[str, Any]) -> float:
    """When a listed file was last written, in seconds since the epoch (local or S3 listing)."""
    stamp = info.get("mtime") or info.get("LastModified") or 0.0
    return stamp.timestamp() if isinstance(stamp, datetime) else float(stamp)


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def _publish(tmp: Path, target: Path) -> None:
    """Move a finished cache folder into place; another process may have done so first."""
    with contextlib.suppress(OSError):
        tmp.rename(target)


def code_version(*modules) -> str:
    """A digest of the source of the modules a stage's result depends on (of a package: of every
    module in it, not its __init__ alone).

    Part of every artifact key, so changed code never serves a result computed by the old code.
    Each module's source is read once per process, so a file edited while a run goes on cannot
    label the running (old) code's results with the new code's version.
    """
    return digest([_source_digest(m) for m in modules])[:16]


@functools.cache
def _source_digest(module) -> str:
    import inspect

    if hasattr(module, "__path__"):
        root = Path(module.__path__[0])
        return digest({str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.py"))})
    return digest(inspect.getsource(module))
