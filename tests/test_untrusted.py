"""Untrusted checkpoints and bad input: refused before any stage runs, each problem named.

Every case goes through the command line as a user would meet it: exit code 2, a message that
names the file (or the field) at fault, and a store left without a single artifact.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from unlearning_audit import checkpoints, cli, corpus, embedded
from unlearning_audit.config import AuditParams, DataConfig, UnlearnConfig
from unlearning_audit.preflight import preflight
from unlearning_audit.store import Store


@pytest.fixture(scope="module")
def published(tiny, tmp_path_factory) -> dict[str, Path]:
    """A small untrained checkpoint as someone would publish it (safetensors, config, tokenizer),
    saved in one file and in shards with an index."""
    facts = corpus.generate(0, {"text": 5, "code": 2, "math": 2})
    tokenizer = embedded.train_tokenizer(facts, 256)
    model = embedded.build_model(tokenizer, tiny)
    folders = {name: tmp_path_factory.mktemp(name) for name in ("single", "sharded")}
    checkpoints.save(model, tokenizer, folders["single"])
    model.save_pretrained(folders["sharded"], max_shard_size="200KB")
    tokenizer.save_pretrained(folders["sharded"])
    return folders


def _copy(published: dict[str, Path], layout: str, tmp_path: Path) -> Path:
    folder = tmp_path / f"checkpoint-{layout}"
    shutil.copytree(published[layout], folder)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _pickle_only(folder: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def _remote_code(folder: Path) -> None:
    _edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})


def _corrupt_header(folder: Path) -> None:
    with open(folder / "model.safetensors", "r+b") as f:
        f.write(b"\xff" * 8)


def _truncated(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _narrower_config(folder: Path) -> None:
    _edit_config(folder, intermediate_size=100)


def _deeper_config(folder: Path) -> None:
    _edit_config(folder, num_hidden_layers=3)


def _no_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()


def _invalid_config(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "llama",')


def _missing_shard(folder: Path) -> None:
    next(iter(sorted(folder.glob("model-*.safetensors")))).unlink()


CASES: list[tuple[str, str, Callable[[Path], None], list[str]]] = [
    ("pickle-only", "single", _pickle_only, ["only pickle weights (pytorch_model.bin)"]),
    ("remote-code", "single", _remote_code, ["config.json needs trust_remote_code", "auto_map"]),
    ("corrupt", "single", _corrupt_header, ["model.safetensors is not a readable safetensors"]),
    ("truncated", "single", _truncated, ["model.safetensors is not a readable safetensors"]),
    (
        "shapes",
        "single",
        _narrower_config,
        [
            "model.safetensors: model.layers.0.mlp.down_proj.weight has shape [64, 176], "
            "config.json gives [64, 100]"
        ],
    ),
    (
        "layers",
        "single",
        _deeper_config,
        ["config.json describes parameters no *.safetensors file holds: model.layers.2."],
    ),
    ("tokenizer", "single", _no_tokenizer, ["no tokenizer (tokenizer.json"]),
    ("config", "single", _invalid_config, ["config.json is not valid JSON"]),
    (
        "shard",
        "sharded",
        _missing_shard,
        ["model.safetensors.index.json names shards that are missing: model-00001-of-"],
    ),
]


def _audit(capsys, folder: Path, data: dict[str, str], store: Path, *extra: str) -> tuple:
    """Run `audit` on a checkpoint folder; its exit code and stderr."""
    argv = ["audit", "--original", str(folder), "--store", str(store), *extra]
    code = cli.main([*argv, "--forget", data["forget"], "--retain", data["retain"]])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("layout", "damage", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_checkpoint_is_refused_naming_the_file(
    published, data_files, tmp_path, capsys, layout, damage, expected
):
    folder = _copy(published, layout, tmp_path)
    damage(folder)
    code, err = _audit(capsys, folder, data_files, tmp_path / "store")
    assert code == 2
    assert f"original: checkpoint {folder}: " in err
    for text in expected:
        assert text in err, err
    assert list(Store(str(tmp_path / "store")).manifests()) == []  # no stage ran


def test_every_checkpoint_problem_is_reported_at_once(published, data_files, tmp_path, capsys):
    original, unlearned = (_copy(published, "single", tmp_path / n) for n in ("o", "u"))
    _truncated(original)
    _narrower_config(unlearned)
    _no_tokenizer(unlearned)
    code, err = _audit(
        capsys, original, data_files, tmp_path / "store", "--unlearned", str(unlearned)
    )
    assert code == 2
    assert f"original: checkpoint {original}: model.safetensors is not a readable" in err
    assert f"unlearned: checkpoint {unlearned}:\n    - model.safetensors: model.layers.0" in err
    assert "\n    - no tokenizer" in err.split("unlearned:", 1)[1]


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_sound_checkpoint_passes_preflight_without_warnings(
    published, data_files, tmp_path, caplog, layout
):
    params = AuditParams(
        original=str(published[layout]),
        methods=[UnlearnConfig(method="GA")],
        data=DataConfig(**data_files),
        store=str(tmp_path / "store"),
    )
    with caplog.at_level(logging.WARNING, logger="unlearning_audit"):
        assert preflight(params) == params.store
    assert not caplog.records


@pytest.mark.parametrize(
    ("damage", "allow", "warning"),
    [
        (_pickle_only, "allow_pickle", "pickle weights (pytorch_model.bin), unsafe, allowed"),
        (_remote_code, "trust_remote_code", "runs its own model code: allowed explicitly"),
    ],
    ids=["pickle", "remote-code"],
)
def test_unsafe_checkpoint_passes_only_when_allowed_and_with_a_warning(
    published, data_files, tmp_path, caplog, damage, allow, warning
):
    folder = _copy(published, "single", tmp_path)
    damage(folder)
    params = AuditParams(
        original=str(folder),
        methods=[UnlearnConfig(method="GA")],
        data=DataConfig(**data_files),
        store=str(tmp_path / "store"),
    )
    with pytest.raises(ValueError, match="refused unless explicitly allowed"):
        preflight(params)
    with caplog.at_level(logging.WARNING, logger="unlearning_audit.checkpoints"):
        assert preflight(params.model_copy(update={allow: True})) == params.store
    assert warning in caplog.text and str(folder) in caplog.text


def test_every_invalid_field_is_reported_at_once_with_its_path(tmp_path, capsys):
    config = tmp_path / "params.json"
    config.write_text(
        json.dumps(
            {
                "name": "../../outside",
                "seed": "zero",
                "relearn": {"budget": -1, "sources": ["retain"]},
                "thresholds": {"forgotten": 2},
                "embedded": {"layers": 0},
                "methods": [{"method": "GA", "lr": 0}, {"method": "forgetful"}],
                "colour": "blue",
            }
        )
    )
    argv = ["audit", "--original", "embedded", "--config", str(config)]
    assert cli.main([*argv, "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("invalid configuration:")
    for path in (
        "name",
        "seed",
        "relearn.budget",
        "relearn.sources",
        "thresholds.forgotten",
        "embedded.layers",
        "methods.0.lr",
        "methods.1.method",
        "colour",
    ):
        assert f"\n  - {path}: " in err, path
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    "key", ["../outside", "report/../../outside", "/etc/passwd", "C:\\Windows", "a//b"]
)
def test_names_and_keys_that_would_leave_the_store_are_refused(key, tmp_path, capsys):
    store = tmp_path / "store"
    for argv, message in (
        (["audit", "--original", "embedded", "--name", key], "  - name: Value error, "),
        (["show", key], "error: "),
        (["report", key, "--out", str(tmp_path / "out")], "error: "),
    ):
        assert cli.main([*argv, "--store", str(store)]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and repr(key) in err, err
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"inside the store|leave the store"):
        Store(str(store)).put(key, src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written anywhere
