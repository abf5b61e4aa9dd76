"""Links to stored reports that a browser opens: a read-only HTTP server for a store's reports,
and, opted into, presigned URLs for an S3 store.

A browser refuses a ``file://`` link from a web page (the Prefect UI's artifacts), and the file
exists on one machine only. `unlearning-audit server` serves the reports of its store (local or
S3: read through the store, verified) over HTTP and tells its workers where
($UNLEARNING_AUDIT_REPORT_URL for the store in $UNLEARNING_AUDIT_REPORT_STORE). Without that
server, a report on an S3 store links to a presigned URL (valid for a week) only with
$UNLEARNING_AUDIT_PRESIGN_REPORTS=1: such a URL carries the access key id and lets whoever holds
it read the report, and Prefect's database keeps it; otherwise the link is the object's s3://
URL. The server answers GET and HEAD for ``/<stage>/<digest>/<file>`` of the report and study
stages only, and only for a file the artifact's verified manifest names: no listing, no other
artifact (checkpoints, data), nothing outside the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import mimetypes
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .report import REPORT_HTML, REPORT_MD, SUMMARY_JSON
from .store import ArtifactRef, CorruptArtifact, Store, check_key

URL_ENV = "UNLEARNING_AUDIT_REPORT_URL"
STORE_ENV = "UNLEARNING_AUDIT_REPORT_STORE"
PRESIGN_ENV = "UNLEARNING_AUDIT_PRESIGN_REPORTS"
SERVED_STAGES = ("report", "study")
PRESIGNED_SECONDS = 7 * 24 * 3600  # S3's longest presigned URL (signature version 4)


def stored_file(store: Store, ref: ArtifactRef, name: str) -> str:
    """Where one file of a stored artifact is: a local path, or the store's URL of it."""
    data = store.manifest(ref.key)["data"]
    if store.local:
        return str(Path(store.root, ref.key, data, name).resolve())
    return f"{store.url.rstrip('/')}/{ref.key}/{data}/{name}"


def published(
    store: Store,
    ref: ArtifactRef,
    table_file: str = SUMMARY_JSON,
    report_file: str = REPORT_MD,
    html_file: str = REPORT_HTML,
) -> dict:
    """A stored report as a run returns it: its summary rows, and where its Markdown and HTML
    reports are."""
    return {
        "rows": store.read_json(ref, table_file),
        "report_file": stored_file(store, ref, report_file),
        "html_file": stored_file(store, ref, html_file),
    }


def report_link(store: Store, ref: ArtifactRef, name: str, environ: dict[str, str]) -> str:
    """A URL of one file of a stored report: the report server's where it serves ``store``
    (``environ`` names it), else a ``file://`` URI on a local store (a local run, read on this
    machine), a presigned URL on S3 where ``environ`` opts in (PRESIGN_ENV), else the object's
    URL in the store."""
    data = store.manifest(ref.key)["data"]
    if environ.get(URL_ENV) and _same_store(environ.get(STORE_ENV), store):
        return f"{environ[URL_ENV].rstrip('/')}/{ref.key}/{name}"
    if store.local:
        return Path(store.root, ref.key, data, name).resolve().as_uri()
    if environ.get(PRESIGN_ENV) == "1":
        path = f"{store.root.rstrip('/')}/{ref.key}/{data}/{name}"
        with contextlib.suppress(NotImplementedError):  # a filesystem that cannot sign
            return store.fs.sign(path, expiration=PRESIGNED_SECONDS)
    return stored_file(store, ref, name)


def _same_store(served: str | None, store: Store) -> bool:
    """Whether the served store is ``store`` (a local one's folder however named)."""
    if not served:
        return False
    other = Store(served)
    if other.local and store.local:
        return Path(other.root).resolve() == Path(store.root).resolve()
    return other.url.rstrip("/") == store.url.rstrip("/")


class _Handler(BaseHTTPRequestHandler):
    """GET and HEAD of a stored report's files (see the module docstring)."""

    store_url: str  # set on the subclass serve() makes

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        found = self._file()
        if found is None:
            self.send_error(HTTPStatus.NOT_FOUND, "no such report file")
            return
        name, content = found
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        self.send_response(HTTPStatus.OK)
        self.send_header(
            "Content-Type", kind + ("; charset=utf-8" if kind.startswith("text") else "")
        )
        self.send_header("Content-Length", str(len(content)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if body:
            self.wfile.write(content)

    def _file(self) -> tuple[str, bytes] | None:
        """The name and bytes of the stored file the request names, its artifact verified and
        the bytes read checked against its manifest; None for anything else."""
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        if len(parts) != 3 or parts[0] not in SERVED_STAGES:
            return None
        key, name = "/".join(parts[:2]), parts[2]
        store = Store(self.store_url)  # verified afresh: a file changed since is refused
        try:
            check_key(key)
            ref = store.get(key)
            entry = store.manifest(key)["files"].get(name) if ref is not None else None
            if entry is None:
                return None
            content = (store.local_dir(ref) / name).read_bytes()
        except (ValueError, CorruptArtifact, OSError):
            return None
        return (name, content) if hashlib.sha256(content).hexdigest() == entry["sha256"] else None

    def log_message(self, format: str, *args) -> None:
        """Quiet: a browser's requests are not the stack's news."""


def serve(store_url: str, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Serve the reports of the store at ``store_url`` on ``host:port`` (0: a free port) from a
    daemon thread; ``shutdown()`` stops it. A remote store's reports are read through it
    (downloaded into the local cache once, verified)."""
    store = Store(store_url)
    handler = type("ReportHandler", (_Handler,), {"store_url": store.url})
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name="report-server", daemon=True).start()
    return server
