"""A lean audit stores no relearned checkpoint: the relearn run that stands in for it stores the
relearned model's activations and weight change, the same ones the extract and metrics stages
get from a stored checkpoint; keep_relearned stores the checkpoint too."""

from __future__ import annotations

import archs
import numpy as np
import pytest
import torch
from test_flow import CHECKS, _task_states

from flows.audit import audit_checkpoint
from tasks.extract import PROBE_SETS, SUMMARY, extract
from tasks.relearn import WEIGHT_CHANGE, read_weight_change
from unlearning_audit import activations, checkpoints
from unlearning_audit.metrics.weights import weight_change, weight_change_from_checkpoint
from unlearning_audit.report import INPUTS
from unlearning_audit.store import ArtifactRef, Store

WEIGHTS = (".safetensors", ".bin")


def holds_weights(store: Store, key: str) -> bool:
    """Whether the artifact stored under ``key`` holds model weights."""
    return any(name.endswith(WEIGHTS) for name in store.manifest(key)["files"])


def report_inputs(store: Store, state) -> dict:
    """What an audit's report was made from, with the references it read it by."""
    return store.read_json(ArtifactRef(**state.result()["report_ref"]), INPUTS)


def relearn_refs(inputs: dict) -> list[ArtifactRef]:
    """Every relearning run an audit's report read: the candidates' and the control's."""
    runs = [run["relearned"] for run in inputs["references"]["runs"]]
    every = [*runs, inputs["references"]["control"]]
    return [
        ArtifactRef(**ref) for by_source in every for refs in by_source.values() for ref in refs
    ]


def stored_ref(store: Store, stage: str, content_hash: str) -> ArtifactRef:
    """The reference of the artifact of ``stage`` with ``content_hash`` (a manifest names its
    inputs by their hashes)."""
    (manifest,) = (m for m in store.manifests(stage) if m["hash"] == content_hash)
    return ArtifactRef(key=manifest["key"], hash=manifest["hash"])


def measured_ref(inputs: dict) -> ArtifactRef:
    """The relearn run whose relearned model the metrics and probe stages compare."""
    return ArtifactRef(**inputs["references"]["runs"][0]["relearned"]["forget"][0])


@pytest.fixture(scope="module")
def kept_run(first_run, audit_params):
    """The audit of first_run again, with keep_relearned."""
    return audit_checkpoint(
        audit_params.model_copy(update={"keep_relearned": True}), return_state=True
    )


def test_a_lean_audit_stores_no_relearned_checkpoint(first_run, audit_params):
    store = Store(audit_params.store)
    inputs = report_inputs(store, first_run[0])
    refs = relearn_refs(inputs)
    assert len(refs) == 2 * 2 * 3  # candidate and control, forget and forget-half, 3 seeds
    assert not any(holds_weights(store, ref.key) for ref in refs)
    for manifest in store.manifests("relearn"):  # only a keep_relearned run stores weights
        assert manifest["meta"]["config"]["keep_checkpoint"] or not holds_weights(
            store, manifest["key"]
        )
    files = store.manifest(measured_ref(inputs).key)["files"]
    assert {SUMMARY, WEIGHT_CHANGE, "forget/layer=0.parquet", "retain/layer=2.parquet"} <= set(
        files
    )
    (run,) = inputs["runs"]
    relearned = {(r["metric"], r["layer"]) for r in run["metrics_relearned"]}
    unlearned = {
        (r["metric"], r["layer"])
        for r in run["metrics_unlearned"]
        if not r["metric"].startswith(("fisher", "depth_share", "tied_share"))
    }
    # every metric of every layer but Fisher's and the depth shares (as before: a relearned
    # model's weight change is read from its stored summary, not from the weights)
    assert relearned == unlearned
    assert {("weight_change", layer) for layer in range(4)} <= relearned
    assert run["probes"]["relearned"] and {r["layer"] for r in run["probes"]["relearned"]} == {
        r["layer"] for r in run["probes"]["unlearned"]
    }


def test_keep_relearned_stores_the_checkpoint_and_changes_no_result(
    first_run, kept_run, audit_params
):
    """Only the run that stands in for the relearned model reruns (keep_relearned is not in the
    other runs' keys), and what the report shows is unchanged."""
    store = Store(audit_params.store)
    states = _task_states(kept_run.state_details.flow_run_id)
    assert sorted(states["relearn"]).count("Completed") == 1, states["relearn"]
    computed = {name for name, s in states.items() if any(x != "Cached" for x in s)}
    assert computed - CHECKS == {"relearn", "probe", "metrics", "verdict", "report"}
    lean, kept = (report_inputs(store, state) for state in (first_run[0], kept_run))
    assert holds_weights(store, measured_ref(kept).key)
    assert [r for r in relearn_refs(kept) if holds_weights(store, r.key)] == [measured_ref(kept)]
    for key in ("metrics_unlearned", "metrics_relearned", "probes", "verdict"):
        assert kept["runs"][0][key] == lean["runs"][0][key], key
    assert kept_run.result()["rows"] == first_run[0].result()["rows"]


@pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted:UserWarning")
def test_relearn_activations_equal_the_extract_stage_on_the_relearned_checkpoint(
    kept_run, audit_params
):
    store = Store(audit_params.store)
    kept = measured_ref(report_inputs(store, kept_run))
    meta = store.manifest(kept.key)["meta"]
    data_ref = stored_ref(store, "data", meta["inputs"]["data"])
    layers = meta["config"]["activations"]["layers"]
    extracted = extract(
        audit_params.store, kept, data_ref, layers, meta["config"]["max_rows"], "cpu"
    )
    summary = store.read_json(kept, SUMMARY)
    assert summary == store.read_json(extracted, SUMMARY)
    for name in PROBE_SETS:
        for layer in summary["layers"]:
            X, Y = (
                activations.read_layer(activations.layer_path(store.local_dir(ref), name, layer))
                for ref in (kept, extracted)
            )
            assert X.shape == (summary["rows"][name], summary["dim"])
            np.testing.assert_array_equal(X, Y)


def test_stored_weight_change_equals_that_of_the_two_loaded_models(kept_run, audit_params):
    store = Store(audit_params.store)
    kept = measured_ref(report_inputs(store, kept_run))
    original = stored_ref(
        store, "checkpoint", store.manifest(kept.key)["meta"]["inputs"]["original"]
    )
    model0, model = (checkpoints.load(store.local_dir(ref), "cpu")[0] for ref in (original, kept))
    expected = weight_change(model0, model)
    stored = read_weight_change(store, kept)
    assert stored == pytest.approx(expected, rel=1e-12, abs=0)
    assert all(value > 0 for value in stored.values())


@pytest.mark.parametrize(
    ("arch", "shard"),
    [("llama", None), ("qwen2", "20KB"), ("gpt_neox", None)],  # gpt_neox: embed_out is lm_head
)
def test_weight_change_from_a_checkpoint_equals_that_of_the_loaded_model(
    arch, shard, tmp_path, monkeypatch
):
    """Read tensor by tensor where the files hold the model's parameters by name (one file or
    shards), else from the loaded checkpoint; the same values either way."""
    tok = archs.tokenizer(["the cat sat on the mat", "a dog ran"] * 5, vocab=300)
    original = archs.model(arch, tok)
    original.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    model0 = checkpoints.load(tmp_path, "cpu")[0]
    model = archs.model(arch, tok)
    model.load_state_dict(model0.state_dict())
    with torch.no_grad():
        for k, param in enumerate(model.parameters()):
            param.add_(torch.randn_like(param), alpha=0.01 * (k + 1))
    expected = weight_change(model0, model)
    with checkpoints.stored_tensors(tmp_path) as stored:
        by_name = {name for name, _ in model.named_parameters()} <= set(stored)
    assert by_name == (arch != "gpt_neox")
    if by_name:  # no second model is built
        monkeypatch.setattr(checkpoints, "load", None)
    assert weight_change_from_checkpoint(tmp_path, model) == pytest.approx(expected, rel=1e-12)
