"""The findings page's claims on constructed study rows whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from unlearning_audit import findings
from unlearning_audit.config import Setting, StudyParams


def run(domain="text", regime="reversible", **extra) -> dict:
    """A study row with what every claim reads; ``extra`` overrides."""
    return {
        "domain": domain,
        "label": extra.pop("label", f"GA {regime}"),
        "method": "GA",
        "setting": "lr=0.001 steps=100",
        "requests": 1,
        "seed": 0,
        "regime": regime,
        "advantage": 0.2,
        "forget_advantage": 0.2,
        "forget_original": 0.9,
        "forget_unlearned": 0.0,
        **extra,
    }


def status(rows: list[dict], claim) -> str:
    return claim(rows, 0.05, 500)["status"]


def test_task_type_holds_only_where_domains_differ_beyond_their_intervals():
    apart = [run("text") for _ in range(12)] + [run("code", "irreversible") for _ in range(12)]
    assert status(apart, findings._task_type) == "holds"
    mixed = [run(d, r) for d in ("text", "code") for r in ("reversible", "irreversible") * 6]
    assert status(mixed, findings._task_type) == "not decided"
    assert status([run("text") for _ in range(5)], findings._task_type) == "cannot test"
    # runs that did not forget are not judged: they neither support nor refute
    assert status(apart[:12] + [run("code", "not-forgotten")] * 12, findings._task_type) == (
        "cannot test"
    )


def test_sources_compare_the_same_runs_paired():
    rng = np.random.default_rng(0)
    rows = [
        run(forget_advantage=0.4 + e, retain_advantage=0.05 + e)
        for e in rng.normal(0, 0.2, 15)  # spread across runs, none between the sources
    ]
    result = findings._sources(rows, 0.05, 500)
    assert result["status"] == "holds"
    assert "forget vs retain: +0.35 [+0.35, +0.35]" in result["summary"]
    same = [run(forget_advantage=a, retain_advantage=a) for a in rng.normal(0.2, 0.1, 15)]
    assert status(same, findings._sources) == "not decided"
    assert status([run()] * 5, findings._sources) == "cannot test"


def test_requests_pair_each_run_with_its_single_request_twin():
    rows = []
    for i in range(10):
        setting = f"lr={i}"
        rows.append(run(setting=setting, forget_advantage=0.3 + 0.01 * i))
        rows.append(
            run(setting=setting, requests=3, regime="irreversible", forget_advantage=0.01 * i)
        )
    result = findings._requests(rows, 0.05, 500)
    assert result["status"] == "holds"
    assert "| 3 | 10 | -0.30 [-0.30, -0.30] | 10 vs 0 of 10 |" in result["lines"]
    flipped = [dict(r, forget_advantage=-r["forget_advantage"]) for r in rows]
    assert status(flipped, findings._requests) == "does not hold"
    assert status([run()], findings._requests) == "cannot test"


def test_irreversible_without_damage_is_reported_with_its_seeds():
    assert status([run()] * 20, findings._irreversible_clean) == "holds"  # 0 of 20: < 0.2
    assert status([run()] * 4, findings._irreversible_clean) == "not decided"  # 0 of 4: wide
    found = [run(label="NPO x", regime="irreversible", seed=s) for s in (0, 1, 2)]
    result = findings._irreversible_clean([run()] * 4 + found, 0.05, 500)
    assert result["status"] == "does not hold"
    assert "irreversible under 3 of 3 seeds" in result["lines"][1]
    flaky = [*found[:2], run(label="NPO x", regime="reversible", seed=2)]
    assert status(flaky, findings._irreversible_clean) == "not decided"


def test_shallow_edits_against_reversibility():
    shallow = [run(splice_restored_top1=0.9, depth_share_top1=0.8) for _ in range(10)]
    deep = [run(regime="irreversible", splice_restored_top1=0.1, advantage=-0.1) for _ in range(10)]
    result = findings._shallow(shallow + deep, 0.05, 500)
    assert result["status"] == "holds"
    assert "10 of 10" in result["summary"] and "0 of 10" in result["summary"]
    assert status(shallow, findings._shallow) == "cannot test"  # nothing deep to contrast
    assert status([run()], findings._shallow) == "cannot test"


def test_fisher_restating_the_loss():
    rng = np.random.default_rng(1)
    rows = [
        run(forget_unlearned=u, fisher_ratio=10 * (0.9 - u), fisher_ratio_model=m)
        for u, m in zip(rng.uniform(0, 0.9, 30), rng.uniform(0, 1, 30), strict=True)
    ]
    assert status(rows, findings._fisher) == "holds"
    swapped = [dict(r, fisher_ratio=r["fisher_ratio_model"]) for r in rows]
    assert status(swapped, findings._fisher) == "not decided"
    assert status([run()] * 5, findings._fisher) == "cannot test"


@pytest.mark.parametrize(("values", "expected"), [([1.0, 2.0, 3.0, 4.0], 2.5), ([5.0], 5.0)])
def test_mean_interval_by_hand(values, expected):
    mean, lower, upper = findings.mean_interval([*values, float("nan")], 0.05, 200)
    assert mean == expected
    assert (lower <= mean <= upper) if len(values) >= 3 else np.isnan(lower)


def test_page_states_its_provenance_and_every_claim():
    rows = [run("text"), run("code", "irreversible")] * 6
    provenance = {"command": "unlearning-audit study --quick", "key": "study/abc", "model": "m"}
    page = findings.findings_markdown(rows, provenance, 0.05, 200)
    assert "`unlearning-audit study --quick`" in page and "`study/abc`" in page
    assert "nothing here is claimed to repeat exactly" in page
    table = [line for line in page.splitlines() if line.startswith("| ") and "**" in line]
    assert len(table) == 8
    assert all(
        any(s in line for s in ("holds", "does not hold", "not decided", "cannot test"))
        for line in table
    )


def test_quantization_counts_runs_whose_excess_clears_the_control():
    rows = [
        run(q4_excess=0.01 * i, q4_recovered=i > 7, q4_excess_p=0.001 if i > 7 else 0.5,
            q8_excess=0.0, q8_recovered=False, q8_excess_p=0.5)
        for i in range(10)
    ]  # fmt: skip
    result = findings._quantization(rows, 0.05, 200)
    assert result["status"] == "holds" and result["summary"] == "2 of 20 run x bit tests"
    assert result["lines"][-2].startswith("| 4 | 10 | +0.05 [")
    # significant alone, but not among twenty tests (Benjamini-Hochberg): no recovery
    lucky = [dict(r, q4_excess_p=0.04 if r["q4_recovered"] else 0.5) for r in rows]
    assert status(lucky, findings._quantization) == "not decided"  # mean excess +0.05
    none = [dict(r, q4_excess=0.0, q4_recovered=False, q4_excess_p=0.5) for r in rows]
    assert status(none, findings._quantization) == "does not hold"
    assert status([run(q4_excess=None, q4_excess_p=None)], findings._quantization) == (
        "cannot test"
    )


def test_reruns_under_further_seeds_count_for_robustness_only():
    grid = [run("text", label=f"r{i}") for i in range(6)] + [run("text", "irreversible", label="x")]
    reruns = [run("text", "irreversible", label="x", seed=s, confirmation=True) for s in (1, 2)]
    provenance = {"command": "c", "key": "k", "model": "m"}
    page = findings.findings_markdown(grid + reruns, provenance, 0.05, 200)
    assert "| text | 6 / 7 | 0.86 [" in page  # the reruns are not in the share
    assert "| irreversible 1, reversible 6 |" in page  # nor in the regimes
    assert "7 unlearning runs in 1 domain(s) and 2 reruns under further seeds" in page
    clean = findings._irreversible_clean(grid + reruns, 0.05, 200)
    assert "1 of 7 judged runs" in clean["lines"][0]
    assert "irreversible under 3 of 3 seeds" in clean["lines"][1]
    assert clean["status"] == "does not hold"


def test_a_grid_whose_runs_share_a_label_is_refused():
    with pytest.raises(ValueError, match="settings must differ"):
        StudyParams(settings=[Setting(lr=1e-3), Setting(lr=1e-3, check_every=3)])
    assert StudyParams(requests=[1, 3, 1]).requests == [1, 3]
    assert len(StudyParams.quick().runs()) == 8
