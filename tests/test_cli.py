"""The `audit` command's flags become the AuditParams they describe; bad input is a clear
error, every problem at once, before any model is loaded."""

from __future__ import annotations

import json
import time

import archs
import pytest

from unlearning_audit import cli
from unlearning_audit.config import (
    AuditParams,
    DataConfig,
    RelearnConfig,
    Thresholds,
    UnlearnConfig,
)
from unlearning_audit.store import Store


def _run(capsys, *argv: str) -> tuple[int, str]:
    start = time.perf_counter()
    code = cli.main(list(argv))
    assert time.perf_counter() - start < 10  # nothing was trained or loaded
    return code, capsys.readouterr().err


def test_unknown_method_and_bad_learning_rate_are_both_reported(capsys, tmp_path):
    code, err = _run(
        capsys,
        "audit",
        "--original",
        "embedded",
        "--method",
        "forgetful",
        "--lr",
        "-0.1",
        "--store",
        str(tmp_path),
    )
    assert code == 2
    assert "unknown method 'forgetful'" in err and "GA+GD" in err
    assert "methods.0.lr" in err and "greater than 0" in err
    assert not any(tmp_path.iterdir())


def test_verdict_statistics_out_of_range_are_reported_with_other_errors(capsys, tmp_path):
    import json

    config = tmp_path / "audit.json"
    config.write_text(
        json.dumps(
            {
                "thresholds": {"alpha": 0.7, "resamples": 5, "metric": "bleu"},
                "relearn": {"seeds": 0},
            }
        )
    )
    code, err = _run(
        capsys,
        "audit",
        "--original",
        "embedded",
        "--config",
        str(config),
        "--lr",
        "-1",
        "--method",
        "GA",
        "--store",
        str(tmp_path / "store"),
    )
    assert code == 2
    for field in ("thresholds.alpha", "thresholds.resamples", "thresholds.metric"):
        assert field in err, field
    assert "relearn.seeds" in err and "methods.0.lr" in err
    assert not (tmp_path / "store").exists()


def test_missing_checkpoint_path_is_named(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    code, err = _run(
        capsys,
        "audit",
        "--original",
        str(missing),
        "--forget",
        "f.json",
        "--retain",
        "r.json",
        "--store",
        str(tmp_path / "store"),
    )
    assert code == 2
    assert f"checkpoint path '{missing}' does not exist" in err
    assert "data.forget: file 'f.json' does not exist" in err  # every problem at once


def test_unwritable_store_is_named(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, err = _run(capsys, "demo", "--store", str(blocker / "store"))
    assert code == 2
    assert "cannot be written" in err and str(blocker) in err


def test_hub_id_without_revision_is_refused(capsys, tmp_path):
    code, err = _run(
        capsys,
        "audit",
        "--original",
        "someorg/somemodel",
        "--forget",
        "a.json",
        "--retain",
        "b.json",
        "--store",
        str(tmp_path),
    )
    assert code == 2 and "pinned revision" in err


@pytest.mark.parametrize("argv", [["study", "--method", "GA", "--method", "nope"]])
def test_study_validates_methods(capsys, argv):
    code, err = _run(capsys, *argv)
    assert code == 2 and "unknown method 'nope'" in err


@pytest.mark.parametrize(
    ("forget", "message"),
    [
        ([], "the forget set is empty"),
        (
            [{"question": "Q1", "answer": "A"}, {"question": "Q2", "answer": "B"}],
            "1 question(s) are in both forget and retain sets",
        ),
        (
            [{"id": "f1", "question": f"Q{i}", "answer": "A"} for i in range(2, 5)],
            "the forget set has duplicate row ids, e.g. ['f1']",
        ),
    ],
)
def test_empty_or_overlapping_data_is_refused(capsys, tmp_path, forget, message):
    import json

    paths = {"forget": tmp_path / "forget.json", "retain": tmp_path / "retain.json"}
    paths["forget"].write_text(json.dumps(forget))
    paths["retain"].write_text(json.dumps([{"question": "Q1", "answer": "A"}]))
    code, err = _run(
        capsys,
        "audit",
        "--original",
        "embedded",
        "--forget",
        str(paths["forget"]),
        "--retain",
        str(paths["retain"]),
        "--store",
        str(tmp_path / "s"),
    )
    assert code == 2 and message in err


def test_missing_layers_and_devices_are_reported_before_any_stage(capsys, tmp_path):
    import json

    config = tmp_path / "audit.json"
    config.write_text(json.dumps({"layers": [0, 2, 11], "device": "cuda:3"}))
    code, err = _run(
        capsys,
        "audit",
        "--original",
        "embedded",
        "--config",
        str(config),
        "--store",
        str(tmp_path / "s"),
    )
    assert code == 2
    assert "layers: [11] do not exist; the model has layers 0 to 4" in err
    import torch

    if not torch.cuda.is_available():
        assert "'cuda:3' was asked for" in err


def _params(*argv: str) -> AuditParams:
    """The AuditParams an `audit` command line describes."""
    return cli.audit_params(cli.build_parser().parse_args(["audit", *argv]))


def _config(tmp_path, params: dict) -> str:
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(params))
    return str(path)


def test_no_flags_leave_every_default():
    assert _params("--original", "embedded") == AuditParams()


def test_every_flag_sets_its_field(tmp_path):
    tofu = tmp_path / "tofu"
    params = _params(
        *("--original", "org/model@v1", "--no-control", "--tofu", str(tofu)),
        *("--tofu-split", "forget05", "--question-column", "q", "--answer-column", "a"),
        *("--group", "position:10", "--prompt-format", r"Question: {question}\nAnswer: {answer}"),
        *("--separator", r"\t", "--max-rows", "50", "--method", "npo", "--lr", "1e-5"),
        *("--steps", "20", "--relearn-lr", "2e-5", "--budget", "0.5", "--seeds", "2"),
        *("--score", "rouge_l", "--no-fisher", "--no-probes", "--quantization", "4", "3"),
        *("--quantize-embeddings", "--store", "s", "--device", "cpu", "--name", "n"),
        *("--precision", "bf16", "--allow-pickle", "--trust-remote-code"),
        *("--no-splice", "--splice-depths", "2", "1"),
    )
    assert params.data.forget == f"{tofu}/forget05.json"
    assert params.data.retain == f"{tofu}/retain95.json"
    assert params.data == DataConfig(
        tofu=str(tofu),
        tofu_split="forget05",
        question_column="q",
        answer_column="a",
        group="position:10",
        prompt_format="Question: {question}\nAnswer: {answer}",  # \n read as a newline
        separator="\t",
        eval_max_rows=50,
    )
    assert params.methods == [UnlearnConfig(method="NPO", lr=1e-5, steps=20)]
    assert params.relearn == RelearnConfig(lr=2e-5, budget=0.5, seeds=2)
    assert params.thresholds == Thresholds(metric="rouge_l")
    assert params == AuditParams(
        original="org/model@v1",
        no_control=True,
        methods=params.methods,
        data=params.data,
        relearn=params.relearn,
        thresholds=params.thresholds,
        fisher=False,
        probes=False,
        quantization_bits=[4, 3],
        quantize_embeddings=True,
        store="s",
        device="cpu",
        precision="bf16",
        name="n",
        allow_pickle=True,
        trust_remote_code=True,
        splice=False,
        splice_depths=[1, 2],
    )


def test_flags_override_the_config_file_key_by_key_and_methods_are_added(tmp_path):
    config = {
        "methods": [{"method": "NPO", "lr": 1e-4, "steps": 30}],
        "data": {"forget": "f.json", "retain": "r.json", "group": "author", "prompt_format": "raw"},
        "relearn": {"batch_size": 4, "budget": 2.0},
        "thresholds": {"alpha": 0.1, "metric": "exact_match"},
        "fisher": False,
        "quantization_bits": [8],
        "name": "from-file",
    }
    params = _params(
        *("--original", "embedded", "--config", _config(tmp_path, config)),
        *("--method", "GA", "--lr", "1e-5", "--lr", "3e-5", "--steps", "10"),
        *("--budget", "0.5", "--score", "probability", "--separator", " | "),
        *("--no-quantization", "--name", "cli"),
    )
    assert params.methods == [
        UnlearnConfig(method="NPO", lr=1e-4, steps=30),  # the file's, its steps kept
        UnlearnConfig(method="GA", lr=1e-5, steps=10),
        UnlearnConfig(method="GA", lr=3e-5, steps=10),
    ]
    assert params.data == DataConfig(
        forget="f.json", retain="r.json", group="author", prompt_format="raw", separator=" | "
    )
    assert params.relearn == RelearnConfig(batch_size=4, budget=0.5)
    assert params.thresholds == Thresholds(alpha=0.1, metric="probability")
    assert (params.fisher, params.quantization_bits, params.name) == (False, [], "cli")


def test_steps_alone_sets_every_method_of_the_config_file(tmp_path):
    config = {"methods": [{"method": "GA", "lr": 1e-4}, {"method": "NPO+KL", "retain_weight": 3}]}
    params = _params(
        "--original", "embedded", "--config", _config(tmp_path, config), "--steps", "7"
    )
    assert params.methods == [
        UnlearnConfig(method="GA", lr=1e-4, steps=7),
        UnlearnConfig(method="NPO+KL", retain_weight=3.0, steps=7),
    ]


def test_methods_without_config_methods_are_the_whole_list(tmp_path):
    """Never the embedded demo's methods plus them: each gets UnlearnConfig's steps and the
    automatic learning rate."""
    expected = [UnlearnConfig(method="GA"), UnlearnConfig(method="NPO+KL")]
    assert expected[0].lr is None and expected[0].steps == 60
    params = _params("--original", "embedded", "--method", "GA", "--method", "npo+kl")
    assert params.methods == expected
    config = _config(tmp_path, {"relearn": {"seeds": 1}})
    params = _params("--original", "embedded", "--config", config, "--method", "GA")
    assert params.methods == expected[:1] and params.relearn == RelearnConfig(seeds=1)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--unlearned", "u", "--method", "GA"], "an unlearned checkpoint is given (--unlearned)"),
        (["--unlearned", "u", "--steps", "5"], "--method, --lr and --steps would be ignored"),
        (["--lr", "1e-4"], "--lr sets the learning rates of the --method runs"),
        (["--steps", "5"], "--steps without --method sets the steps of the methods in --config"),
    ],
)
def test_method_flags_that_would_be_ignored_are_refused(capsys, tmp_path, argv, message):
    store = tmp_path / "store"
    code, err = _run(capsys, "audit", "--original", "embedded", "--store", str(store), *argv)
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not store.exists()


def test_invalid_flag_values_are_reported_together(capsys, tmp_path):
    code, err = _run(
        capsys,
        *("audit", "--original", "embedded", "--store", str(tmp_path / "store")),
        *("--score", "nonsense", "--method", "GA", "--steps", "0", "--budget", "-1"),
        *("--seeds", "0", "--tofu", str(tmp_path), "--tofu-split", "forget07"),
        *("--prompt-format", "{answer} {question}", "--max-rows", "0", "--precision", "fp16"),
    )
    assert code == 2 and err.startswith("invalid configuration:")
    for field in (
        "thresholds.metric",
        "methods.0.steps",
        "relearn.budget",
        "relearn.seeds",
        "data.tofu_split",
        "data.prompt_format",
        "data.eval_max_rows",
        "precision",
    ):
        assert f"\n  - {field}: " in err, field
    assert "'exact_match'" in err and "{question} must come before {answer}" in err
    assert not (tmp_path / "store").exists()


def test_unreadable_config_file_is_a_clear_error(capsys, tmp_path):
    bad = {"missing.json": None, "broken.json": "{", "list.json": "[]"}
    for name, text in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
    for name, message in (
        ("missing.json", "cannot be read"),
        ("broken.json", "not valid JSON"),
        ("list.json", "must hold a JSON object"),
    ):
        path = str(tmp_path / name)
        code, err = _run(capsys, "audit", "--original", "embedded", "--config", path)
        assert code == 2 and err.startswith(f"error: --config {path}: {message}"), err


def test_warnings_are_printed_before_preflight_refuses(capsys, tmp_path):
    """A local checkpoint without a control or groups: both warnings, then preflight's error
    (a retain file that does not exist), and nothing runs."""
    rows = [{"question": f"Who wrote book {i}?", "answer": f"Author {i}"} for i in range(4)]
    tok = archs.tokenizer([f"{r['question']} {r['answer']}" for r in rows] * 3)
    original = archs.save(archs.model("llama", tok), tok, tmp_path / "original")
    forget, retain = tmp_path / "forget.json", tmp_path / "retain.json"
    forget.write_text(json.dumps(rows))
    capsys.readouterr()  # the checkpoint's saving progress
    code, err = _run(
        capsys,
        *("audit", "--original", str(original), "--method", "GA"),
        *("--forget", str(forget), "--retain", str(retain), "--store", str(tmp_path / "store")),
    )
    assert code == 2
    warnings, _, error = err.partition("error: ")
    assert warnings.startswith("warning: no never-learned control (--control)")
    assert "\nwarning: the facts have no groups (--group)" in warnings
    assert error.startswith("invalid audit:")
    assert f"data.retain: file {str(retain)!r} does not exist" in error
    assert "original:" not in error and "methods:" not in error  # the checkpoint passes
    assert list(Store(str(tmp_path / "store")).manifests()) == []  # no stage ran


def test_audit_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["audit", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--steps N",
        "--relearn-lr LR",
        "--budget X",
        "--seeds N",
        "--score {auto,exact_match,token_accuracy,probability,rouge_l}",
        "--prompt-format FMT",
        "--separator S",
        "--group COLUMN|position:N",
        "--tofu DIR_OR_HUB",
        "--tofu-split {forget01,forget05,forget10}",
        "--question-column COLUMN",
        "--answer-column COLUMN",
        "--max-rows N",
        "--no-fisher",
        "--no-probes",
        "--quantization BITS [BITS ...]",
        "--no-quantization",
        "--quantize-embeddings",
        "--no-control",
        "--precision {auto,fp32,bf16-mixed,bf16}",
    ):
        assert flag in out, flag
