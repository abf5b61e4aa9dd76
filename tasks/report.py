"""Report stage (CPU): the Markdown and HTML reports and summary rows, from stored tables only;
and the Prefect artifacts that show them in the UI."""

from __future__ import annotations

import math
import os

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from pydantic_core import to_jsonable_python

from tasks._stage import cached_stage, stage_task, write_json
from tasks.evaluate import SCORES
from tasks.fisher import STORED_DTYPE
from tasks.metrics import TABLE
from tasks.relearn import CURVE, read_curves
from tasks.splice import SPLICE
from tasks.verdict import VERDICT, read_probes
from unlearning_audit import findings, plots, relearning, report_links, stats, study
from unlearning_audit import report as report_mod
from unlearning_audit.config import METRIC_NAMES, StudyParams
from unlearning_audit.metrics import table
from unlearning_audit.report import FINDINGS_MD, STUDY_HTML, STUDY_MD, STUDY_TABLE
from unlearning_audit.store import ArtifactRef, Store, code_version

REPORT, HTML, SUMMARY = report_mod.REPORT_MD, report_mod.REPORT_HTML, report_mod.SUMMARY_JSON


def read_curve(store: Store, refs: list[ArtifactRef], metric: str) -> list[dict]:
    """One relearning source's recovery curve in ``metric``, averaged over its seeds' runs."""
    return relearning.mean_curve(read_curves(store, refs), metric)


def set_means(store: Store, ref: ArtifactRef) -> dict[str, dict[str, float]]:
    """The forget and retain sets' mean scores (those of METRIC_NAMES measured) in a stored
    evaluation, without its per-fact rows: the report shows every score beside the verdict's."""
    scores = store.read_json(ref, SCORES)
    return {
        name: {
            k: scores[name][k]
            for k in METRIC_NAMES
            if k in scores[name] and math.isfinite(scores[name][k])
        }
        for name in ("forget", "retain")
    }


def load_run(store: Store, run: dict) -> dict:
    """A run's stored verdict, metrics tables, recovery curves (in the verdict's metric) and
    the original's and the unlearned model's set means of every score, by its references."""
    decision = store.read_json(run["verdict"], VERDICT)
    metric = decision["metric"]
    return {
        "label": run["label"],
        "method": run["method"],
        "lr": run["lr"],
        "verdict": decision,
        "metrics_unlearned": table.read(store.open(run["metrics_unlearned"], TABLE)),
        "metrics_relearned": table.read(store.open(run["metrics_relearned"], TABLE)),
        "curves": {src: read_curve(store, refs, metric) for src, refs in run["relearned"].items()},
        "probes": read_probes(store, run["probes"]) if run.get("probes") else {},
        "scores": {
            model: set_means(store, run[f"{model}_eval"]) for model in ("original", "unlearned")
        },
        "splice": store.read_json(run["splice"], SPLICE) if run.get("splice") else None,
    }


def read_precision(store: Store, runs: list[dict]) -> dict[str, list[str]]:
    """How the audit's models computed, from the stages' stored outputs: the precision each
    run's relearning trained in (its unlearning's too: one audit setting) and the dtypes of the
    original and the unlearned checkpoints, as their evaluations ran them."""
    evaluations = [runs[0]["original_eval"], *(run["unlearned_eval"] for run in runs)]
    return {
        "training": sorted(
            {store.read_json(run["relearned"]["forget"][0], CURVE)["precision"] for run in runs}
        ),
        "dtypes": sorted({store.read_json(ref, SCORES)["dtype"] for ref in evaluations}),
    }


def fisher_status(store: Store, audit: dict, runs: list[dict]) -> dict | None:
    """The Fisher as the report states it: None where it was off; else its layers, the stored
    dtype and, by model (the original, each run's label), why one has none: its stage skipped
    (the reason its manifest records) or failed after its retries (the audit went on)."""
    if audit["fisher"] is None:
        return None
    outcomes = {"original": runs[0]["fisher"]["original"]}
    outcomes |= {run["label"]: run["fisher"]["unlearned"] for run in runs}
    missing = {}
    for model, outcome in outcomes.items():
        if "failed" in outcome:
            missing[model] = f"failed, the audit went on without it ({outcome['failed']})"
        elif reason := store.manifest(outcome["ref"].key)["meta"].get("skipped"):
            missing[model] = f"skipped ({reason})"
    return {**audit["fisher"], "stored_dtype": str(STORED_DTYPE), "missing": missing}


@stage_task("report", "cpu")
def report(store: str, audit: dict, runs: list[dict], control: dict[str, list[ArtifactRef]]):
    """Write report.md, report.html and summary.json for the audit, and the report inputs
    (report-inputs.json: what the reports were made from, and the references it was read by)
    that `unlearning-audit report` rebuilds them from."""

    def build(s, out):
        loaded = [load_run(s, run) for run in runs]
        judged = loaded[0]["verdict"]  # the runs of an audit share the data and its format
        curves = {src: read_curve(s, refs, judged["metric"]) for src, refs in control.items()}
        inputs = {
            "audit": {
                **audit,
                "metric": judged["metric"],
                "prompt_format": judged["prompt_format"],
                "control_curves": curves,
                "precision": read_precision(s, runs),
                "fisher": fisher_status(s, audit, runs),
            },
            "runs": loaded,
            "references": to_jsonable_python({"runs": runs, "control": control}),
        }
        write_json(out / report_mod.INPUTS, inputs)
        for name, text in report_mod.render(inputs).items():
            (out / name).write_text(text)
        write_json(out / SUMMARY, [report_mod.summary_row(r) for r in inputs["runs"]])
        return {"name": audit["name"], "original": audit["original"]}

    return cached_stage(
        store,
        "report",
        {"runs": runs, "control": control},
        audit,
        code_version(report_mod, plots, relearning),
        build,
    )


@stage_task("publish", "cpu")
def publish(
    store: str,
    report_ref: ArtifactRef,
    table_file: str = SUMMARY,
    report_file: str = REPORT,
    key: str = "audit",
    html_file: str = HTML,
) -> dict:
    """Show a stored report in Prefect: a table artifact of its rows, the Markdown, and a link
    to the HTML report that a browser opens (report_links.report_link: the stack's report
    server, a presigned S3 URL, or a local file); return its rows and where the reports are."""
    s = Store(store)
    found = report_links.published(s, report_ref, table_file, report_file, html_file)
    rows, location, html_location = found["rows"], found["report_file"], found["html_file"]
    link = report_links.report_link(s, report_ref, html_file, dict(os.environ))
    create_table_artifact(
        [report_mod.summary_cells(row) for row in rows],
        key=f"{key}-verdict",
        description=f"Report at {location}",
    )
    create_markdown_artifact(
        s.read_bytes(report_ref, report_file).decode(),
        key=f"{key}-report",
        description=f"Full report, stored at {location}",
    )
    create_link_artifact(
        link,
        link_text="HTML report (figures)",
        key=f"{key}-html",
        description=f"Self-contained HTML report with figures, stored at {html_location}",
    )
    return found


@stage_task("study-report", "cpu")
def study_report(store: str, rows: list[dict], params: StudyParams):
    """Store the study table as Markdown and JSON, the HTML study report and the findings page
    (the paper's claims against the study's numbers)."""

    def build(_, out):
        thresholds = params.thresholds.model_dump()
        found = report_mod.study_statistics(rows, thresholds)
        (out / STUDY_MD).write_text(report_mod.study_markdown(rows, thresholds, found))
        (out / STUDY_HTML).write_text(report_mod.study_html(rows, thresholds, found))
        write_json(out / STUDY_TABLE, rows)
        made_by = "the study flow (its parameters: this artifact's manifest)"
        (out / FINDINGS_MD).write_text(findings.study_page(rows, params, made_by, "this artifact"))

    version = code_version(report_mod, plots, study, stats, findings)
    return cached_stage(store, "study", {"rows": rows}, params, version, build)
