"""Bad input is a clear error, every problem at once, before any model is loaded."""

from __future__ import annotations

import time

import pytest

from unlearning_audit import cli


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
