"""Checkpoints the audit cannot compare are refused before any stage, every mismatch named.

The original, unlearned and control checkpoints must share architecture, parameter names and
shapes, tokenizer vocabulary and chat template. Local folders are compared by preflight; others
once fetched, by the check-compatible task the audit flow runs before its first model stage.
Every checkpoint here is a tiny random one of a real architecture, built locally (archs.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import archs
import pytest
import transformers
from prefect import flow

from flows.audit import audit_checkpoint
from tasks.checkpoint import check_compatible, fetch_checkpoint
from unlearning_audit import checkpoints
from unlearning_audit.config import AuditParams, DataConfig, EmbeddedConfig
from unlearning_audit.preflight import preflight
from unlearning_audit.store import ArtifactRef, Store

TEXTS = [f"Author {i} wrote the book of {w}." for i, w in enumerate(["rain", "salt", "iron"])] * 4
OTHER = [f"Function f{i} returns {i * 7} when called twice." for i in range(12)]
SHAPES = "parameter(s) differ in shape, e.g. lm_head.weight [{v}, 64] != [{v}, 32]"


def _wider(net):
    """The same architecture twice as wide (hidden size 64), freshly initialised."""
    config = net.config.to_dict() | {"hidden_size": 64, "head_dim": 16}
    return transformers.AutoModelForCausalLM.from_config(type(net.config)(**config))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The original (Llama), and checkpoints that differ from it in one way each, or in none
    (``retrained``: another random initialisation)."""
    tok = archs.tokenizer(TEXTS)
    chat = archs.tokenizer(TEXTS, chat=True)
    other = archs.tokenizer(OTHER)
    same_size = archs.tokenizer(OTHER, vocab=len(tok))
    nets = {
        "original": (archs.model("llama", tok), tok),
        "retrained": (archs.model("llama", tok, seed=1), tok),
        "gpt2": (archs.model("gpt2", tok), tok),
        "wider": (_wider(archs.model("llama", tok)), tok),
        "retokenized": (archs.model("llama", same_size), same_size),
        "other-vocabulary": (archs.model("llama", other), other),
        "chat": (archs.model("llama", chat), chat),
    }
    return {
        name: archs.save(net, t, tmp_path_factory.mktemp(name)) for name, (net, t) in nets.items()
    }


def _vocab(folder: Path) -> int:
    """The checkpoint's vocabulary size, as its config.json gives it."""
    return json.loads((folder / "config.json").read_text())["vocab_size"]


def test_same_architecture_and_tokenizer_is_compatible(folders):
    named = {"original": folders["original"], "unlearned": folders["retrained"]}
    assert checkpoints.compatibility_problems(named) == []


def test_architecture_and_parameter_names_are_named(folders):
    (problem,) = checkpoints.compatibility_problems(
        {"original": folders["original"], "unlearned": folders["gpt2"]}
    )
    assert problem.startswith(
        "unlearned vs original: architecture GPT2LMHeadModel (gpt2) != LlamaForCausalLM (llama); "
    )
    assert "parameter(s) only in unlearned, e.g. transformer.h.0.attn.c_attn.bias" in problem
    assert "parameter(s) only in original, e.g. lm_head.weight" in problem
    assert "tokenizer" not in problem and "chat" not in problem


def test_parameter_shapes_are_named(folders):
    (problem,) = checkpoints.compatibility_problems(
        {"original": folders["original"], "unlearned": folders["wider"]}
    )
    count = len(checkpoints.describe(folders["original"])["parameters"])
    shapes = SHAPES.format(v=_vocab(folders["original"]))
    assert problem == f"unlearned vs original: {count} {shapes}"


def test_tokenizer_vocabulary_is_named(folders):
    """Tokenizers trained on other texts: of the same size, only the vocabulary differs; of
    another size, the embeddings' shapes differ too."""
    original = folders["original"]
    named = {"original": original, "control": folders["retokenized"]}
    assert checkpoints.compatibility_problems(named) == [
        f"control vs original: tokenizer vocabularies differ ({_vocab(original)} tokens each, "
        "not the same ones)"
    ]
    (problem,) = checkpoints.compatibility_problems(
        {"original": original, "control": folders["other-vocabulary"]}
    )
    sizes = f"{_vocab(folders['other-vocabulary'])} vs {_vocab(original)} tokens"
    assert problem.startswith("control vs original: 2 parameter(s) differ in shape")
    assert problem.endswith(f"; tokenizer vocabularies differ ({sizes})")


def test_chat_template_is_named(folders):
    named = {"original": folders["original"], "control": folders["chat"]}
    assert checkpoints.compatibility_problems(named) == [
        "control vs original: chat templates differ (original has none)"
    ]
    swapped = {"original": folders["chat"], "unlearned": folders["original"]}
    assert checkpoints.compatibility_problems(swapped) == [
        "unlearned vs original: chat templates differ (unlearned has none)"
    ]


@pytest.mark.parametrize("name", ["vocab.json", "added_tokens.json"])
@pytest.mark.parametrize("content", ["[]", '"tokens"', "5", "null"])
def test_a_vocabulary_file_of_the_wrong_json_type_is_named(folders, tmp_path, name, content):
    """Without tokenizer.json the vocabulary is read from vocab.json and added_tokens.json."""
    folder = Path(shutil.copytree(folders["original"], tmp_path / "slow"))
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.json").write_text('{"a": 0, "b": 1}')
    (folder / name).write_text(content)
    with pytest.raises(ValueError, match=f"^{folder}: {name} is not a JSON object"):
        checkpoints.describe(folder)
    with pytest.raises(ValueError, match=f"{name} is not a JSON object"):
        checkpoints.compatibility_problems({"original": folders["original"], "unlearned": folder})


def test_preflight_names_every_mismatch_of_local_folders_at_once(folders, data_files, tmp_path):
    params = AuditParams(
        original=str(folders["original"]),
        unlearned=str(folders["gpt2"]),
        control=str(folders["chat"]),
        data=DataConfig(**data_files),
        store=str(tmp_path / "store"),
    )
    with pytest.raises(ValueError, match="invalid audit") as caught:
        preflight(params)
    message = str(caught.value)
    assert "\n  - unlearned vs original: architecture GPT2LMHeadModel (gpt2) != " in message
    assert "\n  - control vs original: chat templates differ (original has none)" in message
    assert list(Store(params.store).manifests()) == []  # no stage ran
    compatible = params.model_copy(update={"unlearned": str(folders["retrained"]), "control": None})
    assert preflight(compatible) == params.store


@flow
def _fetch_all(store: str, specs: dict[str, str], config: EmbeddedConfig) -> dict:
    """Each spec fetched into the store; "embedded-control" is the embedded original's control."""
    return {
        name: fetch_checkpoint(store, spec, config, control=name == "embedded-control")
        for name, spec in specs.items()
    }


@pytest.fixture(scope="module")
def fetched(prefect_server, tiny, folders, tmp_path_factory) -> tuple[str, dict[str, ArtifactRef]]:
    """A store holding the fetched embedded original and control (pretrained to no target, which
    takes a step), and fetched copies of the local original and GPT-2 checkpoints."""
    quick = tiny.model_copy(
        update={"eval_every": 1, "target_exact_match": 0, "target_token_accuracy": 0}
    )
    store = str(tmp_path_factory.mktemp("store"))
    specs = {"embedded": "embedded", "embedded-control": "embedded"}
    specs |= {name: str(folders[name]) for name in ("original", "gpt2")}
    return store, _fetch_all(store, specs, quick)


def test_embedded_original_and_its_control_are_compatible(fetched):
    store, refs = fetched
    roles = {"original": refs["embedded"], "unlearned": None, "control": refs["embedded-control"]}
    assert check_compatible.fn(store, roles) is None


def test_original_alone_is_not_read(tmp_path):
    absent = ArtifactRef(key="checkpoint/absent", hash="0" * 64)  # in no store
    assert check_compatible.fn(str(tmp_path), {"original": absent, "control": None}) is None


def test_fetched_checkpoints_are_refused_with_the_same_message(fetched, folders):
    store, refs = fetched
    with pytest.raises(ValueError) as caught:
        check_compatible.fn(store, {"original": refs["original"], "unlearned": refs["gpt2"]})
    named = {"original": folders["original"], "unlearned": folders["gpt2"]}
    (problem,) = checkpoints.compatibility_problems(named)
    assert str(caught.value) == f"incompatible checkpoints:\n  - {problem}"


def test_audit_of_remote_checkpoints_stops_before_any_model_stage(
    prefect_server, folders, data_files, tmp_path
):
    """Checkpoints preflight cannot read (here file:// URLs) are compared once fetched."""
    params = AuditParams(
        original=str(folders["original"]),
        unlearned=f"file://{folders['gpt2']}",
        control=f"file://{folders['chat']}",
        data=DataConfig(**data_files),
        store=str(tmp_path / "store"),
    )
    state = audit_checkpoint(params, return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="incompatible checkpoints") as caught:
        state.result()
    assert "unlearned vs original: architecture GPT2LMHeadModel (gpt2) != " in str(caught.value)
    assert "control vs original: chat templates differ (original has none)" in str(caught.value)
    stages = {m["stage"] for m in Store(params.store).manifests()}
    assert stages == {"data", "checkpoint"}  # fetched, and nothing after
