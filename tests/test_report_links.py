"""Report links a browser opens: the read-only report server of a local store (what it serves,
and what it refuses), presigned URLs on S3, and file URIs for local runs."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from matplotlib import image
from test_report import MIN_STD, _screenshot_module

from unlearning_audit import report_links
from unlearning_audit.store import Store

PAGE = (
    "<!doctype html><html><body style='margin:0'>"
    "<h1 style='background:#c33;color:#fff;height:300px'>verdict: reversible</h1></body></html>"
)


def _report(store: Store, name: str = "a"):
    """A stored report artifact with an HTML page and its Markdown, and a checkpoint artifact."""

    def build(out: Path) -> None:
        (out / "report.html").write_text(PAGE)
        (out / "report.md").write_text("# verdict: reversible\n")

    report = store.cached("report", {"name": name}, {}, "v", build)[0]

    def weights_file(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"w")

    weights = store.cached("checkpoint", {"name": name}, {}, "v", weights_file)[0]
    return report, weights


def _get(url: str, method: str = "GET") -> tuple[int, bytes, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read(), answer.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, b"", ""


@pytest.fixture
def served(tmp_path):
    """A local store with a report, served on a free port; stopped afterwards."""
    store = Store(str(tmp_path / "store"))
    report, weights = _report(store)
    server = report_links.serve(store.url)
    yield store, report, weights, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_the_report_server_serves_stored_report_files(served):
    store, report, _, base = served
    env = {report_links.URL_ENV: base, report_links.STORE_ENV: store.url}
    url = report_links.report_link(store, report, "report.html", env)
    assert url == f"{base}/{report.key}/report.html"
    status, body, kind = _get(url)
    assert (status, body.decode(), kind) == (200, PAGE, "text/html; charset=utf-8")
    assert _get(url, "HEAD")[0] == 200
    assert _get(f"{base}/{report.key}/report.md")[1] == b"# verdict: reversible\n"


def test_the_report_server_refuses_everything_else(served, tmp_path):
    """Only a file a verified report manifest names: not a checkpoint's weights, not a file
    added to the folder, not one changed since it was stored, no listing, nothing outside."""
    store, report, weights, base = served
    folder = store.local_dir(report)
    (folder.parent / "outside.html").write_text("secret")
    refused = [
        f"{base}/{weights.key}/model.safetensors",
        f"{base}/{report.key}/manifest.json",
        f"{base}/{report.key}/",
        f"{base}/report/",
        f"{base}/",
        f"{base}/{report.key}/..%2F..%2Foutside.html",
        f"{base}/{report.key}/../outside.html",
        f"{base}/report/{'0' * 24}/report.html",
    ]
    for url in refused:
        assert _get(url)[0] == 404, url
    (folder / "report.md").write_text("# verdict: irreversible\n")  # tampered in place
    assert _get(f"{base}/{report.key}/report.md")[0] == 404
    assert _get(f"{base}/{report.key}/report.html")[0] == 404  # the whole artifact is refused


def test_a_served_report_renders_in_chromium(served, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    _, report, _, base = served
    shot = tmp_path / "served.png"
    _screenshot_module().render_png(f"{base}/{report.key}/report.html", shot, 600, 400)
    page = image.imread(shot)[..., :3]
    assert page.shape[:2] == (400, 600) and page.std() > MIN_STD  # the red heading painted


def test_links_without_a_server_and_for_another_store(tmp_path):
    """A local run links the file itself; a server of another store is not this store's."""
    store = Store(str(tmp_path / "store"))
    report, _ = _report(store)
    folder = store.local_dir(report)
    assert report_links.report_link(store, report, "report.html", {}) == (
        (folder / "report.html").resolve().as_uri()
    )
    other = {report_links.URL_ENV: "http://x:1", report_links.STORE_ENV: str(tmp_path / "other")}
    assert report_links.report_link(store, report, "report.html", other).startswith("file://")


def test_an_s3_report_is_served_or_presigned_on_request(s3_server, tmp_path, monkeypatch):
    """On S3 the stack's server serves the report (read through the store, verified); without
    one the link is the object's s3:// URL, carrying no credential, unless presigning is asked
    for: then a URL that, fetched without credentials, returns the report."""
    store = Store("s3://reports/store")
    store.fs.mkdir("reports")
    report, _ = _report(store)
    server = report_links.serve(store.url)
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        env = {report_links.URL_ENV: base, report_links.STORE_ENV: store.url}
        url = report_links.report_link(store, report, "report.html", env)
        assert url == f"{base}/{report.key}/report.html" and _get(url)[1].decode() == PAGE
    finally:
        server.shutdown()
        server.server_close()
    plain = report_links.report_link(store, report, "report.html", {})
    assert plain.startswith("s3://reports/store/report/") and "testing" not in plain
    presign = {report_links.PRESIGN_ENV: "1"}
    url = report_links.report_link(store, report, "report.html", presign)
    assert url.startswith(s3_server.endpoint) and "Signature" in url
    assert _get(url)[1].decode() == PAGE
