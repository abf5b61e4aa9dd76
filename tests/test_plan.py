"""The memory and store estimate (plan.py): its figures against a measured peak and against
independent counts, `audit --plan`, preflight's refusal of what cannot fit, and an
out-of-memory error that splitting cannot help failing at once."""

from __future__ import annotations

import json
from pathlib import Path

import peak_memory
import pytest
from prefect import flow

from tasks._stage import FAULTS_ENV, OutOfMemory
from tasks.checkpoint import fetch_checkpoint
from tasks.data import prepare_data
from tasks.unlearn import unlearn
from unlearning_audit import cli, data, plan
from unlearning_audit.config import AuditParams, DataConfig, EmbeddedConfig, UnlearnConfig


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small random Llama checkpoint (about 0.1M parameters) with the embedded tokenizer."""
    folder = tmp_path_factory.mktemp("small")
    return peak_memory.build_checkpoint(folder, hidden=64, layers=2, intermediate=176, vocab=600)


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """A 24M-parameter random Llama checkpoint (fp32): big enough that its training state and
    activations dominate a process's memory noise."""
    return peak_memory.build_checkpoint(tmp_path_factory.mktemp("medium"))


def test_ga_full_fp32_estimate_is_within_30_percent_of_the_measured_peak(medium):
    """The 24M-parameter Llama trained by GA in fp32 for 2 steps on CPU: the estimate's peak
    over the loaded model (training state and activations) against the extra peak RSS measured
    in a fresh process (tests/peak_memory.py; bench_scale.py measures NPO+KL, relearning,
    Fisher and extraction the same way)."""
    folder = medium
    shape = plan.shape_of_folder(folder)
    measured = peak_memory.measure(folder, "GA", {"batch_size": 8, "steps": 2})
    config = UnlearnConfig(method="GA", batch_size=8)
    estimate = plan.unlearn_estimate(shape, config, measured["seq"], plan.Compute("fp32"))
    extra = estimate.peak - shape.parameters * shape.dtype_bytes
    assert 0.7 < extra / measured["extra"] < 1.3, (extra, measured, estimate.parts)


def test_shape_counts_match_the_built_model_and_peft_adapters(small):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shape = plan.shape_of_folder(small)
    model = AutoModelForCausalLM.from_pretrained(small)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert sum(shape.layer_parameters.values()) == shape.parameters
    assert shape.dtype_bytes == 4 and shape.blocks == 2 and shape.vocab == 600
    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    trained = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert trained == 4 * shape.lora_dims


def test_memory_settings_change_the_figures_they_should(small):
    shape = plan.shape_of_folder(small)
    p, seq = shape.parameters, 64
    full = plan.unlearn_estimate(shape, UnlearnConfig(method="NPO+KL"), seq, plan.Compute())
    lora = plan.unlearn_estimate(
        shape, UnlearnConfig(method="NPO+KL", lora_rank=8), seq, plan.Compute()
    )
    assert full.parts["reference"] == 4 * p and "reference" not in lora.parts
    assert full.parts["trained weights and optimizer state"] == 12 * p  # fp32 weight, 2 moments
    assert lora.parts["trained weights and optimizer state"] == 12 * 8 * shape.lora_dims
    assert lora.parts["weights"] == 4 * p
    assert [plan.training_bytes(x, 2) for x in ("fp32", "bf16-mixed", "bf16")] == [16, 18, 8]
    whole = plan.forward_activations(shape, 16, seq, 4, checkpointing=False)
    assert plan.forward_activations(shape, 16, seq, 4, checkpointing=True) < whole
    assert plan.forward_activations(shape, 4, seq, 4, checkpointing=False) * 4 == whole
    ga = UnlearnConfig(method="GA", batch_size=16)
    sharded = plan.unlearn_estimate(shape, ga, seq, plan.Compute(gpus=2))
    assert sharded.parts["trained weights and optimizer state"] == 6 * p
    split = plan.unlearn_estimate(
        shape, ga.model_copy(update={"micro_batches": 4}), seq, plan.Compute()
    )
    assert split.parts["gradients and activations"] == whole // 4 + 4 * p  # gradients stay
    lean = plan.store_estimate(AuditParams(fisher_layers=[1]), shape)
    kept = plan.store_estimate(AuditParams(keep_relearned=True), shape)
    assert kept["relearned"] == 3 * 4 * p and lean["relearned"] == 0
    # the original's values in bf16, each of 3 unlearned models' as its summary
    assert lean["fisher"] == 2 * shape.layer_parameters[1] + 3 * plan.RECORD_BYTES
    assert lean["unlearned"] == 3 * 4 * p  # three full checkpoints (fp32 here)
    adapters = plan.store_estimate(plan.with_lora(AuditParams(keep_relearned=True)), shape)
    assert adapters["unlearned"] == adapters["relearned"] == 3 * 16 * shape.lora_dims * 4
    assert plan.parse_size("80GiB") == 80 * 2**30 and plan.parse_size("141 GB") == 141 * 10**9


def _audit(small, data_files, tmp_path, *extra) -> list[str]:
    return [
        "audit",
        "--original",
        str(small),
        "--method",
        "GA",
        "--forget",
        data_files["forget"],
        "--retain",
        data_files["retain"],
        "--store",
        str(tmp_path / "store"),
        *extra,
    ]


def test_plan_flag_prints_the_estimate_and_runs_nothing(small, data_files, tmp_path, capsys):
    assert cli.main(_audit(small, data_files, tmp_path, "--plan")) == 0
    out = capsys.readouterr().out
    for line in ("unlearn GA", "relearn", "fisher", "evaluate 4-bit", "store: "):
        assert line in out, out
    assert "not enforced" in out  # a CPU device has no budget
    assert not (tmp_path / "store").exists()


def test_preflight_refuses_a_stage_that_cannot_fit_naming_a_setting_that_would(
    medium, data_files, tmp_path, capsys, monkeypatch
):
    """The device budget (UNLEARNING_AUDIT_DEVICE_MEMORY) is the largest peak of the same
    audit with --lora 16: every stage fits with it, full GA training does not."""
    args = _audit(medium, data_files, tmp_path, "--fisher-batch-size", "1")
    lora = cli.audit_params(cli.build_parser().parse_args([*args, "--lora", "16"]))
    with_lora = plan.plan_audit(lora, data.external_sets(lora.data))
    budget = max(s.peak for s in with_lora.stages)
    monkeypatch.setenv(plan.DEVICE_MEMORY_ENV, str(budget))
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "memory: unlearn GA" in err and "--lora 16" in err, err


def test_out_of_memory_that_splitting_cannot_help_fails_at_once_with_the_estimate(
    prefect_server, small, data_files, tmp_path, monkeypatch
):
    """One-row micro-batches already: the injected OOM is not split, nor retried by the task
    (one of three planned faults fires), and the error carries the stage's estimate and a
    setting that fits a device just too small for it."""
    from transformers import AutoTokenizer

    from unlearning_audit import prompts

    config = UnlearnConfig(method="GA", lr=1e-3, steps=1, batch_size=2, micro_batches=2)
    rows = {name: json.loads(Path(path).read_text()) for name, path in data_files.items()}
    seq = plan.sequence_length(prompts.renderer(AutoTokenizer.from_pretrained(small)), rows)
    estimate = plan.unlearn_estimate(plan.shape_of_folder(small), config, seq, plan.Compute())
    monkeypatch.setenv(plan.DEVICE_MEMORY_ENV, str(estimate.peak - 1))
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"unlearn": ["oom"] * 3}))
    monkeypatch.setenv(FAULTS_ENV, str(faults))
    store = str(tmp_path / "store")

    @flow
    def run():
        embedded = EmbeddedConfig()
        checkpoint = fetch_checkpoint(store, str(small), embedded)
        sets = prepare_data(
            store, DataConfig(forget=data_files["forget"], retain=data_files["retain"]), embedded
        )
        return unlearn(store, checkpoint, sets, config, device="cpu")

    with pytest.raises(OutOfMemory) as caught:
        run()
    message = str(caught.value)
    assert "splitting cannot help" in message and "estimated peak" in message, message
    assert "settings that would fit: --lora 16" in message and "--gpus 2" in message, message
    assert json.loads(faults.read_text()) == {"unlearn": ["oom", "oom"]}
