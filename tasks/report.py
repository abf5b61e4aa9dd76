"""Report stage (CPU): the Markdown report and summary rows, from stored tables only; and the
Prefect artifacts that show them in the UI."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks._stage import CPU_OPTIONS, cached_stage, write_json
from tasks.metrics import TABLE
from tasks.relearn import CURVE
from tasks.verdict import VERDICT
from unlearning_audit import report as report_mod
from unlearning_audit.metrics import table
from unlearning_audit.store import ArtifactRef, Store, code_version

REPORT, SUMMARY = "report.md", "summary.json"


def load_run(store: Store, run: dict) -> dict:
    """A run's stored verdict, metrics tables and recovery curves, by its references."""
    return {
        "label": run["label"],
        "method": run["method"],
        "lr": run["lr"],
        "verdict": store.read_json(run["verdict"], VERDICT),
        "metrics_unlearned": table.read(store.open(run["metrics_unlearned"], TABLE)),
        "metrics_relearned": table.read(store.open(run["metrics_relearned"], TABLE)),
        "curves": {
            src: store.read_json(ref, CURVE)["curve"] for src, ref in run["relearned"].items()
        },
    }


@task(name="report", cache_policy=NO_CACHE, **CPU_OPTIONS)
def report(store: str, audit: dict, runs: list[dict], control: dict[str, ArtifactRef]):
    """Write report.md and summary.json for the audit."""

    def build(s, out):
        loaded = [load_run(s, run) for run in runs]
        curves = {src: s.read_json(ref, CURVE)["curve"] for src, ref in control.items()}
        (out / REPORT).write_text(report_mod.markdown({**audit, "control_curves": curves}, loaded))
        write_json(out / SUMMARY, [report_mod.summary_row(r) for r in loaded])
        return {"name": audit["name"], "original": audit["original"]}

    return cached_stage(
        store, "report", {"runs": runs, "control": control}, audit, code_version(report_mod), build
    )


@task(name="publish", cache_policy=NO_CACHE, **CPU_OPTIONS)
def publish(
    store: str,
    report_ref: ArtifactRef,
    table_file: str = SUMMARY,
    report_file: str = REPORT,
    key: str = "audit",
) -> dict:
    """Show a stored report in Prefect (a table artifact and the Markdown); return its rows and
    where the report is."""
    s = Store(store)
    rows = s.read_json(report_ref, table_file)
    manifest = s.manifest(report_ref.key)
    location = f"{s.url.rstrip('/')}/{report_ref.key}/{manifest['data']}/{report_file}"
    create_table_artifact(rows, key=f"{key}-verdict", description=f"Report at {location}")
    create_markdown_artifact(
        s.read_bytes(report_ref, report_file).decode(),
        key=f"{key}-report",
        description=f"Full report, stored at {location}",
    )
    return {"rows": rows, "report_file": location}
