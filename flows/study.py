"""The study flow: the paper's grid, methods x domains x settings, one audit per domain."""

from __future__ import annotations

from prefect import flow

from flows.audit import audit_checkpoint
from tasks.report import STUDY_HTML, STUDY_MD, STUDY_TABLE, publish, study_report
from unlearning_audit.config import StudyParams
from unlearning_audit.store import default_store_url

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
    return publish(store, ref, STUDY_TABLE, STUDY_MD, key="study", html_file=STUDY_HTML)
