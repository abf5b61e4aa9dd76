"""The study flow: the paper's grid, methods x domains x settings x repeated requests, each run
relearned from every source of the grid; settings that read irreversible without catastrophe
are audited again under further seeds."""

from __future__ import annotations

from prefect import flow

from flows.audit import audit_checkpoint
from tasks._stage import ref_of
from tasks.report import STUDY_HTML, STUDY_MD, STUDY_TABLE, publish, study_report
from unlearning_audit.config import StudyParams
from unlearning_audit.store import default_store_url

# The default as an instance, not None, so the deployment's run form shows every field.
DEFAULT_PARAMS = StudyParams()


def _audited(params: StudyParams, domain: str, seed: int, labels: list[str] | None = None):
    """One domain's audit of the grid (or of ``labels``) under ``seed``: its rows, each with
    its domain, seed, setting and request count, and whether it reruns a run under a further
    seed (``confirmation``)."""
    runs = params.runs()
    result = audit_checkpoint(params.audit(domain, seed, labels))
    confirmation = seed != params.seed  # a robustness rerun: outside the grid's statistics
    return [
        {**row, "domain": domain, "seed": seed, "confirmation": confirmation}
        | runs[row["label"]][1]
        for row in result["rows"]
    ]


@flow(name="study")
def study(params: StudyParams = DEFAULT_PARAMS) -> dict:
    """Every run of the grid in every domain of the embedded corpus, then the irreversible,
    non-catastrophic ones again under ``confirm_seeds`` further seeds."""
    store = params.store or default_store_url()
    rows = []
    for domain in params.domains:
        rows += _audited(params, domain, params.seed)
    for domain in params.domains:
        found = [
            r["label"] for r in rows if r["domain"] == domain and r["regime"] == "irreversible"
        ]
        for k in range(1, params.confirm_seeds + 1) if found else ():
            rows += _audited(params, domain, params.seed + k, found)
    ref = study_report(store, rows, params)
    published = publish(store, ref, STUDY_TABLE, STUDY_MD, key="study", html_file=STUDY_HTML)
    return {**published, "report_ref": ref_of(ref).model_dump()}
