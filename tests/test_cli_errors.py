"""One error path in the command line: every user error is one `error:` line naming the thing at
fault, exit code 2, before any work; an internal error is one line and exit code 1, with its
traceback only under --debug; no message carries a credential."""

from __future__ import annotations

import json
import sys

import pytest

from unlearning_audit import cli

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def _config(tmp_path, params) -> str:
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(params))
    return str(path)


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"seed": 2**40}, "seed", "less than or equal to 4294967295"),
        ({"layers": []}, "layers", "at least 1 item"),
        ({"layers": [-1]}, "layers.0", "greater than or equal to 0"),
        ({"device": "tpu"}, "device", "unknown device 'tpu'"),
        ({"device": "cuda:x"}, "device", "unknown device 'cuda:x'"),
        ({"relearn": {"lr": "Infinity"}}, "relearn.lr", "finite number"),
        ({"relearn": {"budget": "Infinity"}}, "relearn.budget", "finite number"),
        ({"relearn": {"budget": 1e9}}, "relearn.budget", "less than or equal to 100"),
        ({"methods": [{"method": "GA", "lr": "NaN"}]}, "methods.0.lr", "finite number"),
        ({"methods": [{"method": "GA", "steps": 10**12}]}, "methods.0.steps", "less than"),
        ({"methods": [{"method": "NPO", "beta": "Infinity"}]}, "methods.0.beta", "finite"),
        ({"embedded": {"seed": -3}}, "embedded.seed", "greater than or equal to 0"),
    ],
)
def test_values_that_would_fail_late_are_refused_up_front(capsys, tmp_path, params, field, message):
    code, err = _run(
        capsys, "audit", "--original", "embedded", "--config", _config(tmp_path, params)
    )
    assert code == 2 and err.startswith("invalid configuration:"), err
    assert f"  - {field}: " in err and message in err, err
    assert not (tmp_path / "audit-store").exists()


def test_flags_are_never_abbreviated(capsys):
    """`--seed 5` must not silently set --seeds (relearning runs per source)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["audit", "--original", "embedded", "--seed", "5"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --seed 5" in capsys.readouterr().err


def test_a_missing_cuda_device_index_is_named(capsys, tmp_path):
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    code, err = _run(
        capsys,
        "audit",
        "--original",
        "embedded",
        "--device",
        f"cuda:{count}",
        "--store",
        str(tmp_path / "s"),
    )
    assert code == 2 and f"device: 'cuda:{count}' was asked for, but torch sees" in err, err


def test_lora_without_peft_is_refused_before_any_stage(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    config = _config(tmp_path, {"methods": [{"method": "GA", "lr": 1e-3, "lora_rank": 4}]})
    code, err = _run(
        capsys, "audit", "--original", "embedded", "--config", config, "--store", str(tmp_path)
    )
    assert code == 2 and "train LoRA adapters, which needs peft" in err, err


@pytest.mark.parametrize("where", ["missing-folder", "folder", "under-a-file"])
def test_an_output_file_that_cannot_be_written_is_refused_before_the_run(capsys, tmp_path, where):
    (tmp_path / "file").write_text("")
    target = {
        "missing-folder": tmp_path / "no" / "such" / "rows.json",
        "folder": tmp_path,
        "under-a-file": tmp_path / "file" / "rows.json",
    }[where]
    code, err = _run(
        capsys,
        "audit",
        "--original",
        "embedded",
        "--json",
        str(target),
        "--store",
        str(tmp_path / "store"),
    )
    assert code == 2 and err.startswith(f"error: --json {target}: "), err
    assert not (tmp_path / "store").exists()  # refused before preflight wrote its probe


def test_a_writable_output_file_is_not_left_behind_by_the_check(tmp_path):
    target = tmp_path / "rows.json"
    cli._check_output_file(str(target), "--json")
    assert not target.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe{}", "not UTF-8 text"),
        (b"[1, 2]", "must hold a JSON object"),
        (b"", "not valid JSON"),
    ],
)
def test_config_files_of_every_wrong_kind_are_named(capsys, tmp_path, content, message):
    path = tmp_path / "audit.json"
    path.write_bytes(content)
    code, err = _run(capsys, "audit", "--original", "embedded", "--config", str(path))
    assert code == 2 and err.startswith(f"error: --config {path}: {message}"), err


def test_a_config_that_is_a_folder_is_named(capsys, tmp_path):
    code, err = _run(capsys, "audit", "--original", "embedded", "--config", str(tmp_path))
    assert code == 2 and err.startswith(f"error: --config {tmp_path}: cannot be read"), err


def test_report_out_naming_a_file_is_refused(capsys, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("keep me")
    code, err = _run(capsys, "report", "report/abc", "--store", str(tmp_path), "--out", str(out))
    assert code == 2 and f"--out {out}: is a file" in err, err
    assert out.read_text() == "keep me"


def _broken(args):
    raise RuntimeError(
        f"a bug, holding {SECRET}, s3://AKIAX:p@ss@bucket/x?X-Amz-Signature=s1gn "
        f"and Bearer hf_{'a1' * 17}"
    )


SHOWN = "a bug, holding ***, s3://***@bucket/x?X-Amz-Signature=*** and Bearer ***"


def test_internal_errors_are_one_line_and_their_traceback_needs_debug(
    capsys, tmp_path, monkeypatch
):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setattr(cli, "cmd_ls", _broken)
    code, err = _run(capsys, "ls", "--store", str(tmp_path))
    assert code == 1
    assert err.startswith(f"internal error: RuntimeError: {SHOWN}\n"), err
    assert "Traceback" not in err and "--debug" in err
    for argv in (["--debug", "ls"], ["ls", "--debug"]):
        code, err = _run(capsys, *argv, "--store", str(tmp_path))
        assert code == 1 and err.startswith("Traceback (most recent call last):"), err
        assert f"RuntimeError: {SHOWN}" in err and "internal error" not in err
        for secret in (SECRET, "p@ss", "s1gn", "a1a1"):
            assert secret not in err


@pytest.mark.parametrize(
    ("value", "traceback"),
    [("1", True), ("yes", True), ("0", False), ("false", False), ("FALSE", False), ("", False)],
)
def test_the_debug_variable_is_off_when_0_false_or_empty(
    capsys, tmp_path, monkeypatch, value, traceback
):
    monkeypatch.setenv(cli.DEBUG_ENV, value)
    monkeypatch.setattr(cli, "cmd_ls", _broken)
    code, err = _run(capsys, "ls", "--store", str(tmp_path))
    assert code == 1 and err.startswith("Traceback" if traceback else "internal error:"), err


def test_an_os_error_under_debug_shows_its_traceback_too(capsys, tmp_path, monkeypatch):
    def denied(args):
        raise PermissionError(13, f"denied by {SECRET}", "/some/file")

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(cli, "cmd_ls", denied)
    code, err = _run(capsys, "--debug", "ls", "--store", str(tmp_path))
    assert code == 2 and err.startswith("Traceback") and SECRET not in err, err
    assert err.endswith("error: denied by ***: /some/file\n"), err


def test_user_errors_never_show_a_credential_of_the_environment(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    path = tmp_path / f"{SECRET}.json"
    code, err = _run(capsys, "audit", "--original", "embedded", "--config", str(path))
    assert code == 2 and "cannot be read" in err and SECRET not in err, err


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    """A tiny Llama checkpoint whose tokenizer has no chat template."""
    import archs

    tok = archs.tokenizer(["Who wrote Q0? A", "Who wrote R? B"])
    folder = tmp_path_factory.mktemp("plain")
    return str(archs.save(archs.model("llama", tok), tok, folder))


def _audit_folder(capsys, tmp_path, folder, data_files, *extra) -> tuple[int, str]:
    argv = ["audit", "--original", folder, "--method", "GA", "--store", str(tmp_path / "s")]
    argv += ["--forget", data_files["forget"], "--retain", data_files["retain"], *extra]
    return _run(capsys, *argv)


def test_a_prompt_format_the_tokenizer_cannot_render_is_refused_in_preflight(
    capsys, tmp_path, plain_checkpoint, data_files
):
    code, err = _audit_folder(
        capsys, tmp_path, plain_checkpoint, data_files, "--prompt-format", "chat"
    )
    assert code == 2, err
    assert "prompt format 'chat': prompt format 'chat' asked for, but the tokenizer has no" in err


def test_a_relearning_source_without_its_data_is_refused_in_preflight(
    capsys, tmp_path, plain_checkpoint, data_files
):
    config = _config(tmp_path, {"relearn": {"sources": ["forget", "unrelated"]}})
    code, err = _audit_folder(capsys, tmp_path, plain_checkpoint, data_files, "--config", config)
    assert code == 2 and "relearning source 'unrelated' needs an unrelated set" in err, err


@pytest.mark.parametrize(
    "params",
    [
        {"store": f"s3://AKIAFAKE:{SECRET}@bucket/audits"},
        {"original": f"s3://AKIAFAKE:{SECRET}@models/base"},
        {"data": {"forget": f"https://user:{SECRET}@host/forget.json", "retain": "r.json"}},
        {"name": "ok", "colour": SECRET},
    ],
)
def test_validation_errors_never_echo_an_input(params):
    """Prefect logs a flow parameter's validation error as it is: no input value may be in it."""
    from pydantic import ValidationError

    from unlearning_audit.config import AuditParams

    with pytest.raises(ValidationError) as info:
        AuditParams.model_validate(params)
    shown = str(info.value) + repr(info.value.errors(include_input=False))
    assert SECRET not in shown


def test_gpu_workers_take_whole_groups_of_gpus(capsys, tmp_path):
    """server --gpus-per-worker K: one gpu worker per K GPUs, each pinned to its own; a K that
    does not divide the GPUs is refused before anything starts."""
    from unlearning_audit.server import gpu_workers

    assert gpu_workers(4) == [{"CUDA_VISIBLE_DEVICES": str(g)} for g in range(4)]
    assert gpu_workers(4, 2) == [
        {"CUDA_VISIBLE_DEVICES": "0,1"},
        {"CUDA_VISIBLE_DEVICES": "2,3"},
    ]
    assert gpu_workers(0, 2) == [{}]  # no GPU: one worker runs the GPU stages on the CPU
    argv = ("server", "--gpus", "3", "--gpus-per-worker", "2", "--home", str(tmp_path))
    code, err = _run(capsys, *argv)
    assert code == 2
    assert "--gpus-per-worker 2 does not divide the 3 GPUs into whole workers" in err
    assert not (tmp_path / "unlearning-audit-logs").exists()  # refused before it started
