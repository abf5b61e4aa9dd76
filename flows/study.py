"""The study flow: the paper's grid, methods x domains x settings, one audit per domain."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.audit import audit_checkpoint
from tasks._stage import CPU_OPTIONS, cached_stage, write_json
from tasks.report import publish
from unlearning_audit import plots
from unlearning_audit import report as report_mod
from unlearning_audit.config import StudyParams
from unlearning_audit.store import code_version, default_store_url

STUDY, TABLE, HTML = "study.md", "study.json", "study.html"


@task(name="study-report", cache_policy=NO_CACHE, **CPU_OPTIONS)
def study_report(store: str, rows: list[dict], params: StudyParams):
    """Store the study table as Markdown and JSON, and the HTML study report."""

    def build(_, out):
        thresholds = params.thresholds.model_dump()
        (out / STUDY).write_text(report_mod.study_markdown(rows, thresholds))
        (out / HTML).write_text(report_mod.study_html(rows, thresholds))
        write_json(out / TABLE, rows)

    version = code_version(report_mod, plots)
    return cached_stage(store, "study", {"rows": rows}, params, version, build)


# The default as an instance, not None, so the deployment's run form shows every field.
DEFAULT_PARAMS = StudyParams()


@flow(name="study")
def study(params: StudyParams = DEFAULT_PARAMS) -> dict:
    """Every method under every setting in every domain of the embedded corpus."""
    store = params.store or default_store_url()
    rows = []
    for domain in params.domains:
        result = audit_checkpoint(params.audit(domain))
        rows += [{**row, "domain": domain} for row in result["rows"]]
    ref = study_report(store, rows, params)
    return publish(store, ref, TABLE, STUDY, key="study", html_file=HTML)
