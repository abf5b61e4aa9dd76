"""The study as a user runs it: the quick grid through the CLI on the tiny embedded model, its
rows with every axis, the findings page, and a rerun served from the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unlearning_audit.config import StudyParams

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).with_name("unlearning-audit"))


def _study(config: Path, out: Path) -> tuple[str, float]:
    outputs = ["--findings", str(out / "findings.md"), "--json", str(out / "rows.json")]
    start = time.perf_counter()
    result = subprocess.run(
        [CLI, "study", "--quick", "--config", str(config), *outputs],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, time.perf_counter() - start


@pytest.fixture(scope="module")
def quick(tiny, tmp_path_factory):
    """The quick study of the tiny model, run once: (stdout, seconds, output folder, store)."""
    out = tmp_path_factory.mktemp("study")
    config = out / "tiny.json"
    config.write_text(json.dumps({"embedded": tiny.model_dump(), "store": str(out / "store")}))
    stdout, seconds = _study(config, out)
    return stdout, seconds, out, config


def _stored_rows(stdout: str) -> list[dict]:
    """Every key of the study's rows, from the stored study.json beside the printed report."""
    report = next(line for line in stdout.splitlines() if line.startswith("report: "))
    return json.loads((Path(report.removeprefix("report: ")).parent / "study.json").read_text())


def test_every_axis_of_the_grid_has_its_runs(quick):
    stdout, _, out, _ = quick
    grid = StudyParams.quick()
    rows = _stored_rows(stdout)
    first = [r for r in rows if r["seed"] == 0]
    assert len(first) == len(grid.methods) * len(grid.settings) * len(grid.requests)
    assert {r["requests"] for r in first} == set(grid.requests)
    assert {r["setting"] for r in first} == {s.label for s in grid.settings}
    assert all(" x2 disjoint" in r["label"] for r in first if r["requests"] == 2)
    confirmed = [r for r in rows if r["seed"] != 0]  # only irreversible, undamaged runs
    assert {r["label"] for r in confirmed} <= {
        r["label"] for r in first if r["regime"] == "irreversible"
    }
    for r in first:
        for look in ("forget", "retain"):  # a deciding look and a source beside the regime
            lower, value, upper = (r[f"{look}_{k}"] for k in ("lower", "advantage", "upper"))
            assert lower <= value <= upper, (r["label"], look)
        assert 0 <= r["depth_share_top1"] <= 1
        assert r["fisher_ratio_model"] > 0 and r["q4_excess"] is not None
    assert json.loads((out / "rows.json").read_text())[0]["requests"] == 1


def test_findings_page_names_its_command_and_store_key(quick):
    stdout, _, out, config = quick
    page = (out / "findings.md").read_text()
    report = next(line for line in stdout.splitlines() if line.startswith("report: "))
    key = "/".join(Path(report.removeprefix("report: ")).parts[-4:-2])  # study/<hash>
    assert f"under `{key}`" in page
    assert f"--config {config}" in page and "study --quick" in page
    claims = [line for line in page.splitlines() if line.startswith("| ") and "| **" in line]
    assert len(claims) == 8
    stored = (Path(report.removeprefix("report: ")).parent / "findings.md").read_text()
    assert stored.split("\n", 3)[3] == page.split("\n", 3)[3]  # the same page but its source


def test_a_rerun_is_answered_from_the_index(quick):
    """With every input unchanged the CLI prints the stored study without starting Prefect and
    writes the same findings page."""
    stdout, cold, out, config = quick
    page = (out / "findings.md").read_text()
    again, warm = _study(config, out)
    print(f"quick study: {cold:.0f} s cold, {warm:.1f} s answered from the index")
    assert "Prefect not started" in again and "Prefect not started" not in stdout
    assert _stored_rows(again) == _stored_rows(stdout)
    assert (out / "findings.md").read_text() == page
    assert warm < cold / 4
