"""The reports of a real tiny audit: the HTML page rendered in headless Chromium, the Prefect
artifacts of the run (verdict, link, progress), the rebuild from the store alone, the study page."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import re
import shutil
from html import escape
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
from unlearning_audit import cli, plots, runtime
from unlearning_audit.config import METRIC_NAMES, AuditParams, StudyParams, UnlearnConfig
from unlearning_audit.report import (
    INPUTS,
    PRECISION_NAMES,
    REPORT_HTML,
    REPORT_MD,
    render,
    two_decimals,
)
from unlearning_audit.store import ArtifactRef, Store
from unlearning_audit.verdict import REGIMES

# recovery curves, CKA, PCA similarity, PCA shift, Fisher, linear probes, splice (one run),
# depth, weight change
EXPECTED_FIGURES = 9
IMG = re.compile(r'<img [^>]*src="data:image/png;base64,([^"]+)"')
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_STD = 0.03  # pixel standard deviation (0..1 scale) below which an image reads as blank
NO_GROUPS = (  # flows/audit.py's sentence for user data without data.group
    "the facts have no groups (data.group), and halves split by question would put "
    "a group's facts on both sides"
)


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
    (row,) = json.loads(keyed["audit-verdict"].data)
    assert next(iter(row)) == "regime" and row["regime"] in REGIMES  # leads with the regime
    values = " ".join(v for k, v in row.items() if k not in ("run", "headline"))
    assert not re.search(r"\d\.\d{4}", values), row  # rounded, no raw floats
    (url,) = re.findall(r"\((file://[^)]+)\)", keyed["audit-html"].data)
    assert url == Path(state.result()["html_file"]).as_uri()
    done = {a.task_run_id: a.data for a in artifacts if a.type == "progress"}
    for stage in ("fetch-checkpoint", "unlearn", "relearn", "extract"):  # the build's too
        runs = [task_run for task_run, name in names.items() if name == stage]
        assert runs and all(done.get(run) == 100 for run in runs), stage
    assert done[None] == 100  # the audit's own run: its progress across the stages


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


def _stored_inputs(audit) -> dict:
    """The report inputs the tiny audit stored beside its report."""
    params, state = audit
    ref = ArtifactRef.model_validate(state.result()["report_ref"])
    return Store(params.store).read_json(ref, INPUTS)


def _without_heldout(curves: dict) -> dict:
    """Recovery curves by relearning source, less the held-out half's."""
    return {source: curve for source, curve in curves.items() if source != "forget-half"}


def _graded_external(inputs: dict) -> dict:
    """The tiny audit's inputs as an audit of user data without groups would store them: the
    verdict in answer-token accuracy (thresholds.metric auto), a chat prompt format, no held-out
    half (and no curves of it); the splice test scored in that metric. The verdicts' reasons,
    verdict.py's sentences, are left out: the report's own words are under test."""
    audit = inputs["audit"]
    graded = {"metric": "token_accuracy", "prompt_format": "chat"}
    return {
        "audit": {
            **audit,
            **graded,
            "domain": "external data",
            "heldout": NO_GROUPS,
            "thresholds": {**audit["thresholds"], "metric": "auto"},
            "control_curves": _without_heldout(audit["control_curves"]),
        },
        "runs": [
            {
                **r,
                "verdict": {**r["verdict"], **graded, "reasons": []},
                "curves": _without_heldout(r["curves"]),
                "splice": r["splice"] and {**r["splice"], "metric": graded["metric"]},
            }
            for r in inputs["runs"]
        ],
    }


def test_report_states_the_metric_the_format_and_every_score(audit):
    """The tiny audit's own report names its metric (exact match, chosen automatically for
    short answers) and prompt template, and shows every score beside the verdict's."""
    inputs = _stored_inputs(audit)
    md = Path(audit[1].result()["report_file"]).read_text()
    assert "- verdict metric: exact match, chosen automatically (thresholds.metric auto)" in md
    assert "answers are short (median at most 4 words)" in md
    assert "- prompt format the model saw: template 'Q: {question}\\nA: {answer}'" in md
    assert "- held-out = half B of the forget set's groups, relearned on half A" in md
    training = PRECISION_NAMES[runtime.resolve_precision("auto")]  # fp32 on a CPU
    assert (
        f"- precision: unlearning and relearning in {training}; checkpoints in float32, each "
        "evaluated in its own dtype" in md
    )
    assert (
        "| run | forget exact match: orig / unl / relearned | retain exact match: orig / unl |"
        in md
    )
    for run in inputs["runs"]:
        means = run["scores"]
        assert set(means) == {"original", "unlearned"}
        for model in means.values():
            assert {"exact_match", "token_accuracy", "probability"} <= set(model["forget"])
        cells = [
            two_decimals(means[model][name]["exact_match"])
            for name in ("forget", "retain")
            for model in ("original", "unlearned")
        ]
        assert "| exact match (verdict) | " + " | ".join(cells) + " |" in md
        forget = run["verdict"]["evidence"]["forget_original"]
        assert means["original"]["forget"]["exact_match"] == pytest.approx(forget)


def test_report_of_a_graded_metric_on_external_data_says_so(audit):
    """Rendered in answer-token accuracy with a chat format and no held-out half, the report
    names that metric wherever it names the verdict's score (exact match only as one row of the
    table of every score), states why it was chosen, the format, the missing held-out half and
    the data."""
    inputs = _graded_external(_stored_inputs(audit))
    runs = inputs["runs"]
    files = render(inputs)
    md, page = files[REPORT_MD], files[REPORT_HTML]
    chosen = (
        "verdict metric: answer-token accuracy, chosen automatically (thresholds.metric auto) by "
        "answer length: the forget set's answers are long (median over 4 words)"
    )
    heldout = (
        "held-out half: unavailable (the facts have no groups (data.group), and halves split by "
        "question would put a group's facts on both sides)"
    )
    for text, quote in ((md, str), (page, escape)):  # the page escapes quotes
        assert quote(chosen) in text
        assert quote("prompt format the model saw: chat (the tokenizer's chat template)") in text
        assert quote(heldout) in text
        assert "forget domain: external data;" in text
        assert quote(f"Recovery curve in answer-token accuracy; {heldout}:") in text
        assert text.count("answer-token accuracy (verdict)") == len(runs)
    assert "| run | forget answer-token accuracy: orig / unl / relearned |" in md
    assert "| metric | answer-token accuracy (auto) |" in md
    assert "Forget-set answer-token accuracy at each relearning step" in page
    assert escape(f"{heldout[0].upper()}{heldout[1:]}. Dashed:") in page  # figure caption
    assert "<th>forget answer-token accuracy: orig / unl / relearned</th>" in page
    exact = [line for line in md.splitlines() if "exact match" in line]
    assert len(exact) == len(runs) and all(x.startswith("| exact match | ") for x in exact)
    assert page.count("exact match") == len(runs)  # the score table's row, per run
    assert "<td>exact match</td>" in page


def test_recovery_plot_labels_its_axis_with_the_metric(monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "_png", lambda fig: drawn.append(fig) or b"")
    curve = [
        {"step": 0, "forget": 0.1, "forget_b": 0.1},
        {"step": 4, "forget": 0.6, "forget_b": 0.3},
    ]
    plots.recovery_curves({"GA": {"forget": curve}}, {}, 0.9, METRIC_NAMES["token_accuracy"])
    (fig,) = drawn
    assert fig.axes[0].get_ylabel() == "answer-token accuracy"


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
    assert f"<small>forget {METRIC_NAMES[row['metric']]} " in page  # the grid names the metric


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
