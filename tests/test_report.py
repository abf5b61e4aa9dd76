"""The reports of a real tiny audit: the HTML page rendered in headless Chromium, the Prefect
artifacts of the run (verdict, link, progress), the rebuild from the store alone, the study page."""

from __future__ import annotations

import base64
import importlib.util
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image
from prefect import flow, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterId,
    FlowRunFilter,
    FlowRunFilterId,
)

from flows.audit import audit_checkpoint
from tasks import report as report_tasks
from tasks._progress import StageProgress
from tasks.report import publish
from unlearning_audit import cli, plots
from unlearning_audit.config import AuditParams, StudyParams, UnlearnConfig
from unlearning_audit.report import REPORT_HTML, REPORT_MD

# recovery curves, CKA, PCA similarity, PCA shift, Fisher, linear probes, weight change
EXPECTED_FIGURES = 7
IMG = re.compile(r'<img [^>]*src="data:image/png;base64,([^"]+)"')
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_STD = 0.03  # pixel standard deviation (0..1 scale) below which an image reads as blank


def _screenshot_module():
    """docs/screenshot.py, the project's own Chromium renderer (docs is not a package)."""
    path = Path(__file__).parents[1] / "docs" / "screenshot.py"
    spec = importlib.util.spec_from_file_location("screenshot", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pixels(png: bytes) -> np.ndarray:
    return image.imread(io.BytesIO(png), format="png")


@pytest.fixture(scope="module")
def audit(prefect_server, tiny, tmp_path_factory):
    """One tiny audit (one GA run of 10 steps) for the whole module: its params and final state."""
    params = AuditParams(
        embedded=tiny,
        store=str(tmp_path_factory.mktemp("store")),
        name="tiny report",
        methods=[UnlearnConfig(method="GA", lr=1e-3, steps=10)],
    )
    state = audit_checkpoint(params, return_state=True)
    assert state.is_completed()
    return params, state


def test_html_report_renders_every_figure_in_chromium(audit, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    html_path = Path(audit[1].result()["html_file"])
    text = html_path.read_text()
    assert not re.search(r'(src|href)="(https?:)?//', text), "the report must load nothing"
    figures = [base64.b64decode(data) for data in IMG.findall(text)]
    assert len(figures) == text.count("<img") == EXPECTED_FIGURES
    heights = 0
    for png in figures:
        assert png.startswith(PNG_SIGNATURE)
        pixels = _pixels(png)
        assert pixels.std() > MIN_STD
        heights += pixels.shape[0]

    shot = tmp_path / "report.png"
    _screenshot_module().render_png(html_path, shot, width=1400, height=6000)
    page = image.imread(shot)[..., :3]
    assert page.shape[:2] == (6000, 1400)
    assert page.std() > MIN_STD
    painted = np.nonzero((page < 0.98).any(axis=(1, 2)))[0]
    # Broken images would collapse to icons: the page is as tall as all figures together.
    assert painted.max() - painted.min() > heights


def test_prefect_artifacts_verdict_link_and_progress(audit):
    state = audit[1]
    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=flow_runs)
        names = {
            t.id: t.name.rsplit("-", 1)[0] for t in client.read_task_runs(flow_run_filter=flow_runs)
        }
    keyed = {a.key: a for a in artifacts if a.key}
    assert {"audit-verdict", "audit-report", "audit-html"} <= set(keyed)
    (url,) = re.findall(r"\((file://[^)]+)\)", keyed["audit-html"].data)
    assert url == Path(state.result()["html_file"]).as_uri()
    done = {a.task_run_id: a.data for a in artifacts if a.type == "progress"}
    for stage in ("unlearn", "relearn", "extract"):
        runs = [task_run for task_run, name in names.items() if name == stage]
        assert runs and all(done.get(run) == 100 for run in runs), stage


def test_report_rebuilds_from_the_store_alone(audit, tmp_path, monkeypatch, capsys):
    """With every artifact but the reports deleted (checkpoints, relearning runs, activations,
    metrics, verdicts), `report` rebuilds report.md and report.html exactly as stored."""
    params, state = audit
    store = tmp_path / "store"
    shutil.copytree(params.store, store)
    deleted = {p.name for p in store.iterdir() if p.is_dir() and p.name != "report"}
    assert {"checkpoint", "unlearn", "relearn"} <= deleted
    for name in deleted:
        shutil.rmtree(store / name)
    stored = Path(state.result()["html_file"]).parent
    digest = stored.parent.name
    monkeypatch.chdir(tmp_path)

    assert cli.main(["report", digest[:8], "--store", str(store)]) == 0
    out = tmp_path / "reports" / digest
    assert str(out / REPORT_HTML) in capsys.readouterr().out
    for name in (REPORT_MD, REPORT_HTML):
        assert (out / name).read_text() == (stored / name).read_text(), name

    opened = []
    monkeypatch.setattr("webbrowser.open", opened.append)
    args = ["report", f"report/{digest}", "--store", str(store), "--out", "elsewhere", "--open"]
    assert cli.main(args) == 0
    assert opened == [(tmp_path / "elsewhere" / REPORT_HTML).as_uri()]


def test_report_of_an_unknown_audit_is_a_clear_error(audit, tmp_path, capsys):
    assert cli.main(["report", "ffffffff", "--store", audit[0].store]) == 2
    assert "no report" in capsys.readouterr().err


@flow
def _study_report(store: str, rows: list[dict]) -> dict:
    """The study flow's last two steps alone, on given rows."""
    ref = report_tasks.study_report(store, rows, StudyParams(store=store))
    return publish(
        store,
        ref,
        report_tasks.STUDY_TABLE,
        report_tasks.STUDY_MD,
        key="study",
        html_file=report_tasks.STUDY_HTML,
    )


def test_study_page_shows_regimes_in_colour_and_the_cka_scatter(audit, tmp_path):
    (row,) = audit[1].result()["rows"]
    rows = [{**row, "domain": "text"}, {**row, "domain": "code", "regime": "reversible"}]
    result = _study_report(str(tmp_path), rows)
    assert result["html_file"].endswith(report_tasks.STUDY_HTML)
    page = Path(result["html_file"]).read_text()
    (figure,) = IMG.findall(page)
    assert _pixels(base64.b64decode(figure)).std() > MIN_STD
    for regime in (row["regime"], "reversible"):
        assert plots.tint(plots.REGIME_COLORS[regime], 0.45) in page


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@flow
def _two_of_five_steps(stream: io.StringIO):
    """A loop that stops early, as unlearning does at collapse; its progress artifact's id."""
    with StageProgress("unit", stream=stream) as progress:
        for step in (1, 2):
            progress(step, 5)
    return progress.artifact


def test_stage_progress_draws_a_bar_and_completes_the_artifact(prefect_server):
    stream = _Terminal()
    artifact_id = _two_of_five_steps(stream)
    assert "\runit |" in stream.getvalue() and stream.getvalue().endswith("\n")
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id]))
        )
    assert artifact.data == 100 and "2/5" in artifact.description
