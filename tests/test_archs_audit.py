"""Every stage on locally built checkpoints of real architectures, mode (a) and mode (b), each
with a never-learned control: the audit completes, every number it stores is finite, and no
stage is skipped without its reason."""

from __future__ import annotations

import copy
import json
import math

import archs
import pytest

from flows.audit import audit_checkpoint
from unlearning_audit import prompts, runtime, unlearning
from unlearning_audit.config import AuditParams, DataConfig, RelearnConfig, UnlearnConfig
from unlearning_audit.store import ArtifactRef, Store
from unlearning_audit.verdict import REGIMES

pytestmark = pytest.mark.slow
ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox", "gemma", "opt")


def facts(seed: int = 0) -> dict[str, list[dict]]:
    """Forget and retain facts in groups of two (a town's flag colour)."""
    rows = [{**r, "group": f"town-pair-{i // 2}"} for i, r in enumerate(archs.flag_facts(36, seed))]
    return {"forget": rows[:12], "retain": rows[12:]}


def _finite(value) -> bool:
    """Whether every number in a JSON-like value is finite."""
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for name, rows in facts().items():
        (folder / f"{name}.json").write_text(json.dumps(rows))
    return {name: str(folder / f"{name}.json") for name in ("forget", "retain")}


def checkpoints(arch: str, folder) -> dict[str, str]:
    """The original (taught every fact), its never-learned control (retain facts only, same
    recipe) and a gradient-ascent unlearned copy of the original, saved as folders."""
    sets = facts()
    texts = [prompts.QA_TEMPLATE.format(**r) for r in sets["forget"] + sets["retain"]]
    runtime.setup(0, "cpu")
    original, tok = archs.loaded(arch, archs.tokenizer(texts), folder / "init")
    fmt = prompts.renderer(tok)
    control = copy.deepcopy(original)
    archs.finetune(original, fmt, sets["forget"] + sets["retain"], 200)
    archs.finetune(control, fmt, sets["retain"], 200)
    unlearned = copy.deepcopy(original)
    unlearning.unlearn(
        unlearned, fmt, {**sets}, UnlearnConfig(method="GA", lr=3e-3, steps=10), seed=0
    )
    models = {"original": original, "control": control, "unlearned": unlearned}
    return {name: str(archs.save(m, tok, folder / name)) for name, m in models.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_both_modes_complete_with_finite_numbers(arch, prefect_server, data_files, tmp_path):
    folders = checkpoints(arch, tmp_path)
    params = AuditParams(
        original=folders["original"],
        control=folders["control"],
        methods=[UnlearnConfig(method="GA", steps=10)],  # lr: the size-scaled default
        data=DataConfig(**data_files, group="group"),
        relearn=RelearnConfig(seeds=1, budget=2.0),
        quantization_bits=[8],
        store=str(tmp_path / "store"),
    )
    store = Store(params.store)
    for mode in (params, params.model_copy(update={"unlearned": folders["unlearned"]})):
        result = audit_checkpoint(mode)
        (row,) = result["rows"]
        assert row["regime"] in REGIMES
        assert row["forget_original"] >= mode.thresholds.known  # it knew what it forgets
        inputs = json.loads(
            (
                store.local_dir(ArtifactRef(**result["report_ref"])) / "report-inputs.json"
            ).read_text()
        )
        (run,) = inputs["runs"]
        assert _finite(run["verdict"]) and _finite(run["curves"])
        values = run["metrics_unlearned"] + run["metrics_relearned"]
        assert values and all(math.isfinite(v["value"]) for v in values)
        measured = {v["metric"] for v in run["metrics_unlearned"]}
        assert {"cka", "weight_change", "fisher_mean_ratio"} <= measured  # Fisher ran
        assert run["verdict"]["evidence"]["forget_quantized"]  # quantization ran
        probe = run["verdict"]["evidence"]
        assert probe["probe_layer"] is not None or probe["probe_skipped"]  # probes, or why not
        assert set(run["curves"]) == {"forget", "forget-half"}  # groups: the held-out half ran
