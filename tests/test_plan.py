"""The memory and store estimate (plan.py): its figures against a measured peak and against
independent counts, `audit --plan`, preflight's refusal of what cannot fit, and an
out-of-memory error that splitting cannot help failing at once."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import large_models
import peak_memory
import pytest
import torch
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


def _stage_run(store: str, small: Path, data_files: dict, config: UnlearnConfig, **options):
    """The unlearn stage of ``config`` on the small checkpoint, on the CPU, into ``store``
    (``options``: the stage task's own, e.g. gradient_checkpointing)."""

    @flow
    def run():
        embedded = EmbeddedConfig()
        checkpoint = fetch_checkpoint(store, str(small), embedded)
        sets = prepare_data(
            store, DataConfig(forget=data_files["forget"], retain=data_files["retain"]), embedded
        )
        return unlearn(store, checkpoint, sets, config, device="cpu", **options)

    return run()


def _unlearn_peak(small: Path, data_files: dict) -> Callable[[UnlearnConfig, bool], int]:
    """The estimated peak of the unlearn stage of a config on the small checkpoint, with or
    without gradient checkpointing, for the rows the stage renders (plan.unlearn_estimate)."""
    from transformers import AutoTokenizer

    from unlearning_audit import prompts

    rows = {name: json.loads(Path(path).read_text()) for name, path in data_files.items()}
    seq = plan.sequence_length(prompts.renderer(AutoTokenizer.from_pretrained(small)), rows)
    shape = plan.shape_of_folder(small)

    def peak(config: UnlearnConfig, checkpointing: bool = False) -> int:
        compute = plan.Compute(checkpointing=checkpointing)
        return plan.unlearn_estimate(shape, config, seq, compute).peak

    return peak


def _oom_message(
    tmp_path: Path, monkeypatch, small: Path, data_files: dict, config: UnlearnConfig, **options
) -> tuple[str, list[str]]:
    """The message of the OutOfMemory the unlearn stage of ``config`` (and the task's
    ``options``) fails with when every build runs out of memory (three planned faults), and
    the faults left unfired."""
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"unlearn": ["oom"] * 3}))
    monkeypatch.setenv(FAULTS_ENV, str(faults))
    with pytest.raises(OutOfMemory) as caught:
        _stage_run(str(tmp_path / "store"), small, data_files, config, **options)
    return str(caught.value), json.loads(faults.read_text())["unlearn"]


def test_out_of_memory_that_splitting_cannot_help_fails_at_once_with_the_estimate(
    prefect_server, small, data_files, tmp_path, monkeypatch
):
    """One-row micro-batches already: the injected OOM is not split, nor retried by the task
    (one of three planned faults fires), and the error carries the stage's estimate and a
    setting that fits a device just too small for it."""
    config = UnlearnConfig(method="GA", lr=1e-3, steps=1, batch_size=2, micro_batches=2)
    peak = _unlearn_peak(small, data_files)(config)
    monkeypatch.setenv(plan.DEVICE_MEMORY_ENV, str(peak - 1))
    message, unfired = _oom_message(tmp_path, monkeypatch, small, data_files, config)
    assert "splitting cannot help" in message and "estimated peak" in message, message
    assert "settings that would fit: --lora 16" in message and "--gpus 2" in message, message
    assert unfired == ["oom", "oom"]


def test_the_out_of_memory_estimate_is_of_the_settings_the_stage_ran_with(
    prefect_server, small, data_files, tmp_path, monkeypatch
):
    """Checkpointing forced off where auto would turn it on: the estimate an out-of-memory error
    reports is the stage's peak without it (the settings it ran with, which its key does not
    hold), and --gradient-checkpointing is among the settings that would fit."""
    config = UnlearnConfig(method="GA", lr=1e-3, steps=1, batch_size=2, micro_batches=2)
    peak = _unlearn_peak(small, data_files)
    off, on = peak(config, False), peak(config, True)
    assert on < off
    monkeypatch.setenv(plan.DEVICE_MEMORY_ENV, str(off - 1))
    message, unfired = _oom_message(
        tmp_path, monkeypatch, small, data_files, config, gradient_checkpointing=False
    )
    assert unfired == ["oom", "oom"]  # one-row micro-batches already: failed at the first
    assert f"estimated peak {plan._size(off)} per device" in message, message
    assert "--gradient-checkpointing" in message.split("settings that would fit:")[1], message


def test_the_out_of_memory_estimate_under_auto_is_of_the_stages_own_choice(
    prefect_server, small, data_files, tmp_path, monkeypatch
):
    """A device where auto checkpoints the requested batch but would not checkpoint it split
    into one-row micro-batches: the stage keeps checkpointing on through its out-of-memory
    rebuild, and the estimate the error reports is the split batch's with checkpointing on, as
    the stage ran it, not off as the split batch alone would choose."""
    config = UnlearnConfig(method="GA", lr=1e-3, steps=1, batch_size=4, stop_at_forget_em=None)
    split = config.model_copy(update={"micro_batches": 4})  # after two rebuilds
    peak = _unlearn_peak(small, data_files)
    budget = math.ceil(peak(split, False) / plan.AUTO_SHARE) + 2
    assert peak(split, False) <= plan.auto_budget(budget) < peak(config, False)
    assert peak(config, True) < peak(config, False)
    assert plan._size(peak(split, True)) != plan._size(peak(split, False))
    monkeypatch.setenv(plan.DEVICE_MEMORY_ENV, str(budget))
    message, unfired = _oom_message(tmp_path, monkeypatch, small, data_files, config)
    assert f"estimated peak {plan._size(peak(split, True))} per device" in message, message
    assert unfired == []


# -- settings left to the stages: auto gradient checkpointing, the Fisher's pass size -------


@pytest.fixture(scope="module")
def seven_b() -> plan.ModelShape:
    """Llama-2-7B's shape, built on the meta device from its config (large_models.py)."""
    return plan.shape_of(large_models.large_configs()["7B (Llama-2-7B)"])


def _by_stage(estimate: plan.Plan) -> dict[str, plan.StageEstimate]:
    return {s.stage.split(" lr=")[0]: s for s in estimate.stages}


def test_a_7b_default_audit_fits_141_gb_choosing_checkpointing_and_passes_where_needed(seven_b):
    """bf16-mixed, 256 tokens per row: without a budget (auto off, 16 samples per Fisher pass)
    NPO+KL's and the Fisher's peaks exceed 141 GB; on a 141 GB device the defaults fit. Auto
    checkpoints exactly the training stages that would not fit the share of it auto aims at
    without it and that it shrinks, and the Fisher passes are the most samples that fit
    that share (one more would not)."""
    budget = plan.parse_size("141GB")
    aim = plan.auto_budget(budget)
    assert aim == int(0.9 * budget)
    audit = large_models.six_method_audit()
    unbudgeted = _by_stage(plan.plan(audit, seven_b, 256, "bf16-mixed", None))
    fitted = plan.plan(audit, seven_b, 256, "bf16-mixed", budget)
    assert not fitted.too_large(), fitted.table()
    assert unbudgeted["unlearn NPO+KL"].peak > budget and unbudgeted["fisher"].peak > budget
    training = {f"unlearn {m.label}".split(" lr=")[0]: m for m in audit.methods}
    checkpointed = []
    for name, stage in _by_stage(fitted).items():
        if name.startswith(("unlearn", "relearn", "control relearn")):
            config = training.get(name, audit.relearn)
            estimate = plan.unlearn_estimate if name in training else plan.relearn_estimate
            off, ckpt = (
                estimate(seven_b, config, 256, plan.Compute("bf16-mixed", c)).peak
                for c in (False, True)
            )
            assert off == unbudgeted[name].peak
            on = off > aim and ckpt < off  # over the aim, and checkpointing lowers it
            assert stage.chosen == f"checkpointing {'on' if on else 'off'} (auto)", name
            assert stage.peak == (ckpt if on else off)
            checkpointed += [name] * on
    assert checkpointed == ["unlearn GA+GD", "unlearn GA+KL", "unlearn NPO+KL"]
    assert _by_stage(fitted)["unlearn NPO"].peak > aim  # its gradients': nothing to save
    size = int(_by_stage(fitted)["fisher"].chosen.split()[0])
    assert 1 < size < 16
    assert plan.fisher_estimate(seven_b, size, None, 256).peak <= aim
    assert plan.fisher_estimate(seven_b, size + 1, None, 256).peak > aim
    assert (
        "checkpointing on (auto)" in fitted.table() and f"{size} samples per pass" in fitted.table()
    )


def test_a_7b_audit_fits_80_gib_with_lora_alone_and_names_settings_where_nothing_does(seven_b):
    """On 80 GiB the defaults do not fit (full training's state and moments), --lora 16 alone
    does, with the Fisher in passes of fewer samples; no setting proposed sizes the Fisher's
    passes (the stage does). Checkpointing forced off is refused where auto would fit, naming
    --gradient-checkpointing. On 40 GiB the Fisher does not fit even in passes of one sample,
    and the refusal still names a setting."""
    audit = large_models.six_method_audit()
    gib80 = plan.parse_size("80GiB")
    defaults = plan.plan(audit, seven_b, 256, "bf16-mixed", gib80)
    assert defaults.too_large()
    fitting = plan.fitting_settings(audit, seven_b, 256, "bf16-mixed", gib80)
    assert fitting[0] == "--lora 16" and not [f for f in fitting if "fisher" in f], fitting
    lora = plan.plan(plan.with_lora(audit), seven_b, 256, "bf16-mixed", gib80)
    assert not lora.too_large(), lora.table()
    assert _by_stage(lora)["fisher"].chosen == "2 samples per pass"  # bench_scale's figure
    budget = plan.parse_size("141GB")
    off = audit.model_copy(update={"gradient_checkpointing": False})
    refused = plan.plan(off, seven_b, 256, "bf16-mixed", budget)
    assert [s.stage.split(" lr=")[0] for s in refused.too_large()] == [
        "unlearn GA+GD",
        "unlearn GA+KL",
        "unlearn NPO+KL",
    ]
    assert "--gradient-checkpointing" in plan.fitting_settings(
        off, seven_b, 256, "bf16-mixed", budget
    )
    gib40 = plan.parse_size("40GiB")
    small_device = plan.plan(plan.with_lora(audit), seven_b, 256, "bf16-mixed", gib40)
    assert [s.stage for s in small_device.too_large()] == ["fisher"]
    assert _by_stage(small_device)["fisher"].chosen == "1 samples per pass"
    named = replace(
        small_device,
        fitting=tuple(
            plan.fitting_settings(plan.with_lora(audit), seven_b, 256, "bf16-mixed", gib40)
        ),
    )
    (problem,) = named.problems()
    assert problem.startswith("memory: fisher needs about") and "--no-fisher" in problem, problem
    assert named.fitting == ("--no-fisher",)  # more GPUs do not help: the Fisher runs on one


def test_auto_checkpointing_needs_a_budget_and_the_models_support(small):
    """The one decision the plan and the stages share (plan.use_checkpointing): a bool is kept;
    auto is on only over a known budget, for a model that supports it, where the stage's peak
    without it is more than the share auto aims at (plan.AUTO_SHARE) of the budget."""
    shape = plan.shape_of_folder(small)
    config = UnlearnConfig(method="GA", batch_size=2, stop_at_forget_em=None)
    without = plan.unlearn_estimate(shape, config, 32, plan.Compute()).peak

    def estimate(on: bool) -> plan.StageEstimate:
        return plan.unlearn_estimate(shape, config, 32, plan.Compute(checkpointing=on))

    assert shape.checkpointing
    assert plan.use_checkpointing("auto", shape, without, estimate)  # no room left
    assert plan.use_checkpointing("auto", shape, int(without / 0.9) - 2, estimate)
    assert not plan.use_checkpointing("auto", shape, int(without / 0.9) + 2, estimate)
    assert not plan.use_checkpointing("auto", shape, None, estimate)
    unsupported = replace(shape, checkpointing=False)
    assert not plan.use_checkpointing("auto", unsupported, without - 1, estimate)
    assert plan.use_checkpointing(True, shape, None, estimate)
    assert not plan.use_checkpointing(False, shape, without - 1, estimate)


def test_the_unlearn_stage_checkpoints_where_its_device_needs_and_trains_the_same(
    prefect_server, small, data_files, tmp_path, monkeypatch
):
    """A device budget between the stage's estimated peak with and without checkpointing (the
    plan's functions, for the rows the stage renders): the stage turns it on and its manifest
    says so; a large budget leaves it off. The same weights either way (float32, CPU)."""
    from safetensors.torch import load_file

    from unlearning_audit.store import Store

    config = UnlearnConfig(method="GA", lr=1e-3, steps=2, batch_size=2, stop_at_forget_em=None)
    peak = _unlearn_peak(small, data_files)
    on, off = peak(config, True), peak(config, False)
    assert on < off
    weights, used = [], []
    for budget in (int((on + off) / 2 / plan.AUTO_SHARE), 2**40):
        monkeypatch.setenv(plan.DEVICE_MEMORY_ENV, str(budget))
        store = str(tmp_path / f"store-{budget}")
        ref = _stage_run(store, small, data_files, config)
        used.append(Store(store).manifest(ref.key)["meta"]["gradient_checkpointing"])
        weights.append(load_file(Store(store).local_dir(ref) / "model.safetensors"))
    assert used == [True, False]
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][name], rtol=1e-5, atol=1e-7)


def test_checkpointing_is_auto_by_default_and_can_be_forced_either_way(small, data_files, tmp_path):
    """The CLI's two flags and the deployment's JSON parameters: auto, on or off."""
    parse = cli.build_parser().parse_args
    args = _audit(small, data_files, tmp_path)
    given = {
        (): "auto",
        ("--gradient-checkpointing",): True,
        ("--no-gradient-checkpointing",): False,
    }
    for flags, expected in given.items():
        assert cli.audit_params(parse([*args, *flags])).gradient_checkpointing is expected
    with pytest.raises(SystemExit):
        parse([*args, "--gradient-checkpointing", "--no-gradient-checkpointing"])
    for value in ("auto", True, False):
        parsed = AuditParams.model_validate_json(json.dumps({"gradient_checkpointing": value}))
        assert parsed.gradient_checkpointing == value
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        AuditParams(gradient_checkpointing="sometimes")
