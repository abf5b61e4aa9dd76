"""Calibration: audits whose true answer is known, on the demo's embedded model, each under
three seeds, through the audit flow as a user runs it (DESIGN.md, "Verdict": calibration).

* The demo's three settings read the same regime under every seed, and none is inconclusive.
* Known deleted: a second never-learned model (the control's recipe, another initialisation and
  data order), audited in mode (b) as if it were the unlearned original, never reads reversible.
* Known hidden: gradient ascent on the LM head alone (the body untouched) hides the answers and
  keeps the knowledge; it must read reversible.

Fisher, probes, quantization and the splice test are off: they are evidence beside the regime,
not in it.
"""

from __future__ import annotations

import threading

import pytest

from flows.audit import audit_checkpoint
from unlearning_audit import checkpoints, embedded
from unlearning_audit.config import AuditParams, EmbeddedConfig, UnlearnConfig

pytestmark = pytest.mark.slow
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def second_never_learned(tmp_path_factory):
    """A folder that will hold the second never-learned model: pretrained in a thread from the
    start of the module, on the core the audits leave free; join the thread before use."""
    folder = tmp_path_factory.mktemp("published") / "second-never-learned"

    def build() -> None:
        model, tokenizer, _ = embedded.build(EmbeddedConfig(), control=True, variant=1)
        checkpoints.save(model, tokenizer, folder)

    thread = threading.Thread(target=build)
    thread.start()
    yield thread, folder
    thread.join()


@pytest.fixture(scope="module")
def base(prefect_server, second_never_learned, tmp_path_factory) -> AuditParams:
    return AuditParams(
        store=str(tmp_path_factory.mktemp("store")),
        fisher=False,
        probes=False,
        quantization_bits=[],
        splice=False,
    )


@pytest.fixture(scope="module")
def demo(base) -> dict[int, list[dict]]:
    return {
        seed: audit_checkpoint(base.model_copy(update={"seed": seed}))["rows"] for seed in SEEDS
    }


def test_demo_regimes_hold_under_three_seeds(demo):
    by_method: dict[str, list[str]] = {}
    for rows in demo.values():
        for row in rows:
            by_method.setdefault(row["label"], []).append(row["regime"])
    assert len(by_method) == 3
    for method, regimes in by_method.items():
        assert len(set(regimes)) == 1, (method, regimes)
        assert not regimes[0].startswith("inconclusive"), (method, regimes)
    assert len({regimes[0] for regimes in by_method.values()}) == 3  # three regimes shown


def test_known_deleted_model_never_reads_reversible(base, demo, second_never_learned):
    thread, folder = second_never_learned
    thread.join()
    assert (folder / "config.json").is_file()
    for seed in SEEDS:
        params = base.model_copy(update={"seed": seed, "unlearned": str(folder)})
        (row,) = audit_checkpoint(params)["rows"]
        assert row["regime"].startswith("irreversible"), (seed, row["headline"])


def test_known_hidden_edit_reads_reversible(base, demo):
    hide = UnlearnConfig(method="GA", lr=1e-3, steps=100, head_only=True, stop_at_forget_em=0.1)
    for seed in SEEDS:
        params = base.model_copy(update={"seed": seed, "methods": [hide]})
        (row,) = audit_checkpoint(params)["rows"]
        assert row["regime"].startswith("reversible"), (seed, row["headline"])
