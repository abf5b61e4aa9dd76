"""A store others can write: nothing read from it decides what an audit trusts, a manifest must
belong to the key it is stored under, credentials never appear, and a store that does not exist
is an error, not an empty store.

Local stores, and a real S3 endpoint (moto on 127.0.0.1, the ``s3_server`` fixture of
conftest.py) for credentials and missing buckets.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import json
import logging
import pickle
import re
import shutil
import time
import traceback
from pathlib import Path

import pytest

import tasks._stage as stage_module
from tasks._stage import from_json, load_inputs, load_model, to_json
from tasks.evaluate import evaluate
from tasks.extract import PROBE_SETS, extract
from tasks.fisher import fisher
from tasks.metrics import metrics
from tasks.relearn import relearn
from tasks.splice import splice_run
from tasks.unlearn import unlearn
from unlearning_audit import checkpoints, cli, corpus, embedded
from unlearning_audit.config import EmbeddedConfig, RelearnConfig, UnlearnConfig
from unlearning_audit.store import (
    MANIFEST,
    ArtifactRef,
    CorruptArtifact,
    Store,
    StoreUnavailable,
    check_key,
    check_url,
    filesystem,
    redact,
)

ROOT = Path(__file__).resolve().parents[1]
KEY_ID = "AKIATRUSTAUDITFAKE42"
SECRET = "Tru5t/Audit+Fake/Secret/0a1b2c3d4e5f"
URL_SECRET = "url-borne/Secret+9z8y7x"
MODEL_TASKS = {
    "unlearn": unlearn,
    "relearn": relearn,
    "evaluate": evaluate,
    "extract": extract,
    "fisher": fisher,
    "metrics": metrics,
    "splice_run": splice_run,
}


def _files(files: dict[str, bytes]):
    def build(out: Path):
        for name, content in files.items():
            (out / name).write_bytes(content)
        return {"note": "built"}

    return build


def _manifest_path(store_root: Path, key: str) -> Path:
    return store_root / key / MANIFEST


def _edit_manifest(path: Path, **changes) -> None:
    manifest = json.loads(path.read_text())
    for name, value in changes.items():
        if name == "meta":
            manifest["meta"] = {**manifest["meta"], **value}
        else:
            manifest[name] = value
    path.write_text(json.dumps(manifest))


# -- 1. trust comes from the run, never from the store -------------------------------------


@pytest.fixture(scope="module")
def remote_code_checkpoint(tmp_path_factory) -> tuple[Path, ArtifactRef]:
    """A small untrained checkpoint whose config.json asks for its own model code (auto_map),
    stored as a fetch stage would store it when trust was not given; then its manifest is
    edited to say trust_remote_code true, as anyone with write access to the store could."""
    tiny = EmbeddedConfig(hidden_size=32, intermediate_size=64, layers=1, heads=2, vocab_size=256)
    facts = corpus.generate(0, {"text": 5, "code": 2, "math": 2})
    tokenizer = embedded.train_tokenizer(facts, 256)
    model = embedded.build_model(tokenizer, tiny)
    root = tmp_path_factory.mktemp("trust-store")
    store = Store(str(root))

    def build(out: Path) -> dict:
        checkpoints.save(model, tokenizer, out)
        config = json.loads((out / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
        (out / "config.json").write_text(json.dumps(config))
        (out / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
        return {"source": "somewhere", "trust_remote_code": False}

    ref, _ = store.cached("checkpoint", {"content": "x"}, {"trust_remote_code": False}, "v", build)
    _edit_manifest(_manifest_path(root, ref.key), meta={"trust_remote_code": True})
    return root, ref


def test_a_manifest_saying_trust_does_not_make_load_model_trust(remote_code_checkpoint):
    root, ref = remote_code_checkpoint
    store = Store(str(root))
    assert store.manifest(ref.key)["meta"]["trust_remote_code"] is True  # the edit took...
    assert store.get(ref.key) == ref  # ...and meta is covered by no hash: it still verifies
    with pytest.raises(ValueError, match=r"needs trust_remote_code \(auto_map"):
        load_model(store, ref, "cpu")


def test_only_the_run_parameter_reaches_the_loader(remote_code_checkpoint, monkeypatch):
    root, ref = remote_code_checkpoint
    seen: list[bool] = []

    def spy(folder, device=None, allow_pickle=False, trust_remote_code=False, gpus=1):
        seen.append(trust_remote_code)
        raise RuntimeError("stop here")

    monkeypatch.setattr(stage_module.checkpoints, "load", spy)
    store = Store(str(root))
    for trust in (False, True):
        with pytest.raises(RuntimeError, match="stop here"):
            load_model(store, ref, "cpu", trust_remote_code=trust)
        with pytest.raises(RuntimeError, match="stop here"):
            load_inputs(store, ref, ref, "cpu", trust_remote_code=trust)
    with pytest.raises(RuntimeError, match="stop here"):
        load_model(store, ref, "cpu")  # the default
    assert seen == [False, False, True, True, False]
    assert not hasattr(stage_module, "trusts_remote_code")


@pytest.mark.parametrize("name", sorted(MODEL_TASKS))
def test_every_model_task_takes_trust_as_a_parameter(name):
    fn = MODEL_TASKS[name].fn
    param = inspect.signature(fn).parameters["trust_remote_code"]
    assert param.default is False and param.annotation in (bool, "bool")
    # deployed, the parameter travels as JSON to the stage flow and comes back a bool
    assert from_json(json.loads(json.dumps(to_json({"trust_remote_code": True})))) == {
        "trust_remote_code": True
    }
    source = inspect.getsource(inspect.getmodule(fn))
    assert "trust_remote_code=trust_remote_code" in source
    assert '"trust_remote_code"' not in source  # nothing recorded in, or read from, a manifest


def test_the_audit_flow_passes_trust_to_every_model_task():
    tree = ast.parse((ROOT / "flows" / "audit.py").read_text())
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in MODEL_TASKS
    ]
    assert {c.func.id for c in calls} == set(MODEL_TASKS)
    for call in calls:
        keywords = {k.arg for k in call.keywords}
        assert "trust_remote_code" in keywords, f"line {call.lineno}: {call.func.id}"


# -- 2. a manifest belongs to the key it is stored under -----------------------------------


def _two_artifacts(root: Path) -> tuple[Store, ArtifactRef, ArtifactRef]:
    store = Store(str(root))
    a, _ = store.cached("evaluate", {"checkpoint": "A"}, {"rows": 1}, "v", _files({"s": b"good"}))
    b, _ = store.cached("evaluate", {"checkpoint": "B"}, {"rows": 1}, "v", _files({"s": b"bad"}))
    return store, a, b


@pytest.mark.parametrize("edit_key", [False, True], ids=["swapped", "swapped-and-key-edited"])
def test_artifacts_swapped_between_keys_are_corrupt_and_recomputed(tmp_path, edit_key):
    """Swapping two verdict-bearing artifacts' folders must not swap what they say."""
    _, a, b = _two_artifacts(tmp_path)
    folder_a, folder_b = tmp_path / a.key, tmp_path / b.key
    folder_a.rename(tmp_path / "evaluate" / "tmp")
    folder_b.rename(folder_a)
    (tmp_path / "evaluate" / "tmp").rename(folder_b)
    if edit_key:
        _edit_manifest(folder_a / MANIFEST, key=a.key)
        _edit_manifest(folder_b / MANIFEST, key=b.key)
    fresh = Store(str(tmp_path))
    assert fresh.get(a.key) is None and fresh.get(b.key) is None
    assert list(fresh.manifests()) == []
    findings = {f.key: f for f in fresh.check_integrity()}
    assert set(findings) == {a.key, b.key}
    for key, other in ((a.key, b.key), (b.key, a.key)):
        problem = findings[key].problem
        if edit_key:
            assert problem == (
                f"{key}: {MANIFEST} is stored under {key} but its inputs, config and version "
                f"give {other}"
            )
        else:
            assert problem == f"{key}: {MANIFEST} is stored under {key} but names {other}"
        assert findings[key].kind == "corrupt" and f"{key}/{MANIFEST}" in findings[key].remove
    with pytest.raises(CorruptArtifact, match="is stored under"):
        fresh.read_bytes(a, "s")  # the old reference no longer reads the wrong content
    # the next run recomputes each under its own key, to its own content
    again, cached = fresh.cached(
        "evaluate", {"checkpoint": "A"}, {"rows": 1}, "v", _files({"s": b"good"})
    )
    assert not cached and again == a and Store(str(tmp_path)).read_bytes(a, "s") == b"good"


def test_repair_removes_misplaced_artifacts(tmp_path):
    store, a, b = _two_artifacts(tmp_path)
    copy = Store.key_for("evaluate", {"checkpoint": "C"}, {"rows": 1}, "v")
    shutil.copytree(tmp_path / b.key, tmp_path / copy)  # B's content copied under C's key
    _edit_manifest(tmp_path / copy / MANIFEST, key=copy)
    findings = store.check_integrity()
    assert [(f.kind, f.key) for f in findings] == [("corrupt", copy)]
    removed = store.repair(findings)
    assert f"{copy}/{MANIFEST}" in removed and not (tmp_path / copy / MANIFEST).exists()
    assert store.check_integrity() == []
    assert {m["key"] for m in store.manifests()} == {a.key, b.key}


def test_a_manifest_moved_to_another_stage_is_corrupt(tmp_path):
    _, a, _ = _two_artifacts(tmp_path)
    moved = "metrics/" + a.key.split("/", 1)[1]
    shutil.copytree(tmp_path / a.key, tmp_path / moved)
    _edit_manifest(tmp_path / moved / MANIFEST, key=moved)
    with pytest.raises(CorruptArtifact, match="stored under stage metrics but names stage evalu"):
        Store(str(tmp_path)).manifest(moved)


@pytest.mark.parametrize(
    "removed", [("inputs",), ("config", "version"), ("inputs", "config", "version")]
)
def test_a_manifest_without_its_derivation_is_corrupt(tmp_path, removed):
    """Removing all three used to skip the check: B's content copied under A's key, its key
    edited and its derivation stripped, passed for A's."""
    _, a, b = _two_artifacts(tmp_path)
    shutil.rmtree(tmp_path / a.key)
    shutil.copytree(tmp_path / b.key, tmp_path / a.key)
    manifest = json.loads(_manifest_path(tmp_path, a.key).read_text())
    manifest["key"] = a.key
    for name in removed:
        del manifest["meta"][name]
    _manifest_path(tmp_path, a.key).write_text(json.dumps(manifest))
    with pytest.raises(CorruptArtifact) as raised:
        Store(str(tmp_path)).manifest(a.key)
    assert str(raised.value) == (
        f"{a.key}: {MANIFEST} is stored under {a.key} but its meta does not record its "
        + ", ".join(removed)
    )
    assert Store(str(tmp_path)).get(a.key) is None
    assert [f.key for f in Store(str(tmp_path)).check_integrity()] == [a.key]


def test_every_stage_shape_of_inputs_and_config_recomputes_to_its_key(tmp_path):
    """What the stages pass (refs, pydantic configs, dumps with excludes, tuples, None, floats)
    survives the manifest's JSON and derives the same key."""
    store = Store(str(tmp_path))
    ref = ArtifactRef(key="checkpoint/abc", hash="f" * 64)
    relearn_config = RelearnConfig()
    cases = [
        (
            "unlearn",
            {"checkpoint": ref, "data": ref, "seed": 3},
            {**UnlearnConfig(method="NPO").model_dump(), "precision": "bf16-mixed"},
        ),
        (
            "relearn",
            {"checkpoint": ref, "data": ref, "source": "forget", "seed": 0, "original": ref},
            {
                "relearn": relearn_config.model_dump(exclude={"sources", "seeds"}),
                "max_rows": 200,
                "keep_checkpoint": True,
                "generate": False,
                "precision": "fp32",
                "activations": {"layers": [0, 2], "sets": PROBE_SETS},
            },
        ),
        (
            "activations",
            {"checkpoint": ref, "data": ref},
            {"layers": None, "max_rows": 20, "sets": PROBE_SETS},
        ),
        ("evaluate", {"checkpoint": ref}, {"bits": None, "lr": 1e-5, "x": 0.1 + 0.2, 1: "int"}),
        ("metrics", {"original_fisher": None, "candidate": ref}, {"k": 2}),
        ("checkpoint", {"control": False}, EmbeddedConfig()),
    ]
    for stage, inputs, config in cases:
        made, _ = store.cached(stage, inputs, config, "v1-abc", _files({"x": stage.encode()}))
        assert made.key == Store.key_for(stage, inputs, config, "v1-abc")
        meta = Store(str(tmp_path)).manifest(made.key)["meta"]
        assert Store.key_for(stage, meta["inputs"], meta["config"], meta["version"]) == made.key
        assert Store(str(tmp_path)).get(made.key) == made


def test_meta_and_created_are_not_covered_by_any_hash(tmp_path):
    """The documented limit: descriptive fields can be edited unnoticed, so nothing that
    decides anything is read from them."""
    _, a, _ = _two_artifacts(tmp_path)
    _edit_manifest(
        _manifest_path(tmp_path, a.key), created="1999-01-01T00:00:00", meta={"note": "forged"}
    )
    assert Store(str(tmp_path)).get(a.key) == a
    assert Store(str(tmp_path)).check_integrity() == []


def test_put_refuses_a_meta_that_does_not_derive_its_key(tmp_path):
    store = Store(str(tmp_path))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("x")
    key = Store.key_for("plain", {"in": 1}, {}, "v")
    with pytest.raises(ValueError, match="cannot be stored: its meta does not record its inputs"):
        store.put(key, src)
    wrong = {"inputs": {"in": 2}, "config": {}, "version": "v"}
    with pytest.raises(ValueError, match="cannot be stored: its inputs, config and version give"):
        store.put(key, src, wrong)
    assert not (tmp_path / "plain").exists()
    ref = store.put(key, src, {"inputs": {"in": 1}, "config": {}, "version": "v", "note": "x"})
    assert Store(str(tmp_path)).get(key) == ref


# -- 2b. a hostile manifest is corrupt, never a crash; every file served is checked ---------


@pytest.mark.parametrize(
    ("depth", "problem"),
    [
        (900, "but its inputs, config and version are nested too deeply to derive a key from"),
        (100_000, "is not a valid manifest"),  # json.loads itself gives up
    ],
)
def test_a_manifest_nested_too_deeply_is_corrupt_not_a_crash(tmp_path, capsys, depth, problem):
    _, a, b = _two_artifacts(tmp_path)
    manifest = json.loads(_manifest_path(tmp_path, a.key).read_text())
    manifest["meta"]["inputs"] = "DEEP"
    deep = json.dumps(manifest).replace('"DEEP"', "[" * depth + "]" * depth)
    _manifest_path(tmp_path, a.key).write_text(deep)
    store = Store(str(tmp_path))
    with pytest.raises(CorruptArtifact) as raised:
        store.manifest(a.key)
    assert str(raised.value).endswith(problem)
    assert store.get(a.key) is None  # so the stage recomputes it
    assert [m["key"] for m in store.manifests()] == [b.key]
    findings = store.check_integrity()
    assert [(f.kind, f.key) for f in findings] == [("corrupt", a.key)]
    assert f"{a.key}/{MANIFEST}" in store.repair(findings)
    assert cli.main(["verify", "--store", str(tmp_path)]) == 0
    assert cli.main(["ls", "--store", str(tmp_path)]) == 0
    assert b.key in capsys.readouterr().out


def test_a_second_key_naming_a_verified_hash_has_its_own_files_checked(tmp_path):
    """Two keys with the same content share a hash: verifying one must not vouch for the
    other's files (the local store serves each key's own folder)."""
    store = Store(str(tmp_path))
    a, _ = store.cached("evaluate", {"checkpoint": "A"}, {}, "v", _files({"s": b"same"}))
    b, _ = store.cached("evaluate", {"checkpoint": "B"}, {}, "v", _files({"s": b"same"}))
    assert a.hash == b.hash and store.read_bytes(a, "s") == b"same"
    next((tmp_path / b.key).glob("*/s")).write_bytes(b"evil")
    assert store.get(b.key) is None
    with pytest.raises(CorruptArtifact, match="s does not match its sha256"):
        store.read_bytes(b, "s")
    assert store.read_bytes(a, "s") == b"same"


@pytest.mark.parametrize("extra", ["chat_template.jinja", "sub/added.json", ".hidden"])
def test_a_file_its_manifest_does_not_name_makes_a_local_artifact_corrupt(tmp_path, extra):
    """A local artifact is read as its folder: an added chat_template.jinja would change the
    prompts of every later run served from it."""
    _, a, b = _two_artifacts(tmp_path)
    added = next((tmp_path / a.key).glob("*/s")).parent / extra
    added.parent.mkdir(parents=True, exist_ok=True)
    added.write_text("{{ 'forged' }}")
    fresh = Store(str(tmp_path))
    message = f"{a.key}: holds files its manifest does not name: {extra}"
    with pytest.raises(CorruptArtifact) as raised:
        fresh.local_dir(a)
    assert str(raised.value) == message
    assert fresh.get(a.key) is None
    findings = fresh.check_integrity()
    assert [(f.kind, f.key, f.problem) for f in findings] == [("corrupt", a.key, message)]
    fresh.repair(findings)
    assert not added.exists() and fresh.get(b.key) == b


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("created", None),
        ("created", 5),
        ("files", {"s": "not an entry"}),
        ("files", {"s": {"sha256": "0" * 64}}),
        ("files", {"s": {"sha256": "0" * 64, "size": "1"}}),
        ("files", {"s": {"sha256": "0" * 64, "size": 1, "extra": []}}),
    ],
)
def test_a_manifest_field_that_ls_and_verify_read_is_checked(tmp_path, capsys, field, value):
    """`ls` sorted on `created` and summed the sizes, unchecked: one bad manifest crashed it."""
    _, a, b = _two_artifacts(tmp_path)
    manifest = json.loads(_manifest_path(tmp_path, a.key).read_text())
    manifest[field] = value
    if value is None:
        del manifest[field]
    _manifest_path(tmp_path, a.key).write_text(json.dumps(manifest))
    with pytest.raises(CorruptArtifact, match="not a valid manifest"):
        Store(str(tmp_path)).manifest(a.key)
    assert cli.main(["ls", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert b.key in out and a.key not in out
    assert cli.main(["verify", "--store", str(tmp_path)]) == 1
    assert f"{a.key}: {MANIFEST} is not a valid manifest" in capsys.readouterr().out


# -- 4. a store that does not exist; keys too long ------------------------------------------


def test_a_missing_local_store_is_an_error_not_an_empty_store(tmp_path):
    missing = Store(str(tmp_path / "no" / "such" / "path"))
    message = f"store URL '{tmp_path}/no/such/path' does not exist (no such folder)"
    with pytest.raises(ValueError) as raised:
        missing.check_readable()
    assert str(raised.value) == message
    with pytest.raises(ValueError, match="does not exist"):
        missing.check_integrity()
    with pytest.raises(ValueError, match="does not exist"):
        list(missing.manifests())
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        Store(str(tmp_path / "file")).check_readable()
    empty = Store(str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    empty.check_readable()
    assert empty.check_integrity() == [] and list(empty.manifests()) == []
    assert list(empty.manifests("report")) == []


def test_a_key_too_long_for_a_file_system_is_a_clear_error(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(
        ValueError, match=r"is too long \(5006 bytes in UTF-8\): a key has at most 1024 bytes"
    ):
        store.manifest("stage/" + "a" * 5000)
    multibyte = "/".join(["é" * 100] * 6)  # 605 characters, 1205 bytes: too long for S3
    with pytest.raises(ValueError, match=r"too long \(1205 bytes in UTF-8\)"):
        store.manifest(multibyte)
    with pytest.raises(ValueError, match="and at most 255 between two '/'"):
        check_key("stage/" + "é" * 200)  # 400 bytes in 200 characters
    assert store.manifest("stage/" + "a" * 250) is None
    assert check_key("/".join(["a" * 200] * 5)) is not None
    assert check_key("/".join(["é" * 100] * 5)) is not None  # 1004 bytes


# -- 3. credentials never appear --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("s3://AKIAX:sec+ret/x@bucket/prefix", "s3://***@bucket/prefix"),
        ("store s3://AKIAX:secret@bucket/p failed", "store s3://***@bucket/p failed"),
        ("http://user:pa%40ss@127.0.0.1:9000/b", "http://***@127.0.0.1:9000/b"),
        ("https://ghp_token123@github.com/org/repo", "https://***@github.com/org/repo"),
        ("gcs://a:b@bkt/x and gs://tok@bkt/y", "gcs://***@bkt/x and gs://***@bkt/y"),
        ('"endpoint_url": "http://u:p@h:1"', '"endpoint_url": "http://***@h:1"'),
        ("env_s3://k:s@b", "env_s3://***@b"),
        ("S3A://KEY:s@b/x", "S3A://***@b/x"),
        ("s3://:secret@b", "s3://***@b"),
        # a password holding '@' or characters a URL should not hold raw: masked whole
        ("s3://KEY:SEC@RET@bucket/x", "s3://***@bucket/x"),
        ("s3://KEY:SEC@RET@bucket/model@v1", "s3://***@bucket/model@v1"),
        ("s3://tok@en@bucket/x", "s3://***@bucket/x"),
        *[(f"s3://KEY:SE{c}CRET@bucket/x", "s3://***@bucket/x") for c in '"<>`\\{}|^'],
        # credentials in the query (or the fragment): presigned S3 and GCS, Azure SAS, OAuth
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIAX%2F2024"
            "&X-Amz-Security-Token=tok&X-Amz-Signature=abc123",
            "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=***"
            "&X-Amz-Security-Token=***&X-Amz-Signature=***",
        ),
        (
            "https://a.blob.core.windows.net/c/f?sv=2022&sig=Zm9v%3D",
            "https://a.blob.core.windows.net/c/f?sv=2022&sig=***",
        ),
        ("https://h/x?token=abc&n=1", "https://h/x?token=***&n=1"),
        ("https://h/x?access_token=abc#frag", "https://h/x?access_token=***#frag"),
        ("https://h/cb#access_token=abc", "https://h/cb#access_token=***"),
        ("https://h/x?user=me&password=hunter2", "https://h/x?user=me&password=***"),
        ("https://h/x?X%2DAmz%2DSignature=abc", "https://h/x?X%2DAmz%2DSignature=***"),
        ("https://h/x?a=1?apikey=abc", "https://h/x?a=1?apikey=***"),
        (
            "https://h/x?GoogleAccessId=me&Signature=abc",
            "https://h/x?GoogleAccessId=me&Signature=***",
        ),
        # no credential: left alone, and check_url accepts them
        (
            "abfs://container@account.dfs.core.windows.net/path",
            "abfs://container@account.dfs.core.windows.net/path",
        ),
        (
            "az://container@account/p and wasbs://c@a.blob.core.windows.net/p",
            "az://container@account/p and wasbs://c@a.blob.core.windows.net/p",
        ),
        (
            "https://h/x?author=me&revision=main&sv=2022",
            "https://h/x?author=me&revision=main&sv=2022",
        ),
        ("s3://bucket/model@v1", "s3://bucket/model@v1"),
        ("s3://bucket/a:b@c", "s3://bucket/a:b@c"),
        ("hf://org/model@main", "hf://org/model@main"),
        ("http://host:9000/path", "http://host:9000/path"),
        ("file:///tmp/a@b", "file:///tmp/a@b"),
        ("write to maintainers@example.com", "write to maintainers@example.com"),
        ("org/model@0123abc", "org/model@0123abc"),
    ],
)
def test_redact_and_check_url_agree_on_every_form_of_url_credential(text, expected):
    assert redact(text) == expected
    if expected == text:
        assert check_url(text, "URL") == text
    else:
        with pytest.raises(ValueError, match="holds credentials") as raised:
            check_url(text, "URL")
        assert redact(text) in str(raised.value)


def test_a_url_checked_on_its_own_is_masked_up_to_its_last_at():
    """Whitespace in a password ends a URL in free text, not in a URL that is checked."""
    for url in ("s3://KEY:SE CRET@bucket/x", "s3://KEY:SE\tC@R\nET@bucket/x"):
        with pytest.raises(ValueError) as raised:
            check_url(url, "store URL")
        assert str(raised.value).startswith("store URL 's3://***@bucket/x' holds credentials")


@pytest.mark.parametrize(
    ("name", "value", "masked"),
    [
        ("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG", True),
        ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE", True),
        ("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEJr//////////", True),
        ("HF_TOKEN", "old-style-token-0123", True),
        ("HUGGING_FACE_HUB_TOKEN", "another-token-4567", True),
        ("MY_SERVICE_PASSWORD", "s3cr3t-pass-word", True),
        ("PREFECT_API_KEY", "pnu_abcdefghijkl", True),
        ("AZURE_STORAGE_SAS_TOKEN", "sv=2022&sig=abcd", True),
        ("DB_SECRET", "short", False),  # under 8 characters: too common to mask
        ("AWS_REGION", "eu-central-1", False),  # not a secret's name
    ],
)
def test_redact_masks_every_secret_named_variable_of_the_environment(
    monkeypatch, name, value, masked
):
    monkeypatch.setenv(name, value)
    text = f"failed with {value} in it"
    assert redact(text) == ("failed with *** in it" if masked else text)


def test_redact_masks_bearer_and_hugging_face_tokens_and_storage_options():
    token = "hf_" + "aB3" * 11
    assert redact(f"Authorization: Bearer {token}") == "Authorization: Bearer ***"
    assert redact(f"401 for {token}.") == "401 for hf_***."
    assert redact("the hf_transfer option") == "the hf_transfer option"
    options = {"client_kwargs": {"aws_secret_access_key": URL_SECRET}, "anon": "no-anon-here"}
    assert redact(f"x {URL_SECRET} no-anon-here", options) == "x *** no-anon-here"


HOSTILE = {  # 100 KB each, the shapes that make a backtracking search quadratic
    "schemes": "a://" * 25_000 + "@",
    "scheme characters": "a." * 50_000,
    "colons": "s3://k" + ":" * 100_000 + "@",
    "ats and slashes": "s3://k:" + "@/" * 50_000,
    "query separators": "s3://b/?" + "&a" * 50_000,
    "long query names": "s3://b/?" + ("a" * 127 + "&") * 780,
    "question marks": "s3://b/" + "?" * 100_000,
    "bearers": "bearer " * 14_000,
    "hf prefixes": "hf_" * 33_000,
    "many URLs": "s3://k:s@b " * 9_000,
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_redact_and_check_url_are_linear_on_hostile_text(name):
    text = HOSTILE[name]
    started = time.perf_counter()
    redact(text)
    with contextlib.suppress(ValueError):
        check_url(text, "URL")
    assert time.perf_counter() - started < 2  # measured 0.02 s; quadratic takes minutes


def test_every_regex_of_the_code_compiles_on_python_3_10():
    """requires-python is >=3.10: no possessive quantifier nor atomic group (3.11 syntax)."""
    parser = getattr(re, "_parser", None) or importlib.import_module("sre_parse")
    patterns = [
        (path.name, node.args[0].value)
        for folder in ("unlearning_audit", "tasks", "flows")
        for path in sorted((ROOT / folder).glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "re"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ]
    assert len(patterns) > 10
    for where, pattern in patterns:
        parsed = repr(parser.parse(pattern).data)
        assert "POSSESSIVE_REPEAT" not in parsed and "ATOMIC_GROUP" not in parsed, where


def test_a_url_with_credentials_is_refused_everywhere(tmp_path, monkeypatch):
    url = f"s3://{KEY_ID}:{URL_SECRET}@bucket/prefix"
    with pytest.raises(ValueError) as raised:
        Store(url)
    assert str(raised.value) == (
        "store URL 's3://***@bucket/prefix' holds credentials; give them through the "
        "environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the service's own "
        "variables) or an AWS profile (AWS_PROFILE), never in the URL"
    )
    for exc in (raised.value, raised.value.__cause__, raised.value.__context__):
        assert exc is None or (URL_SECRET not in str(exc) and KEY_ID not in str(exc))
    with pytest.raises(ValueError, match="URL 'https://\\*\\*\\*@host/x' holds credentials"):
        filesystem("https://token@host/x")
    with pytest.raises(ValueError, match="storage option endpoint_url 'http://\\*\\*\\*@h:1'"):
        Store(str(tmp_path), storage_options={"endpoint_url": "http://u:p@h:1"})
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{KEY_ID}:{URL_SECRET}@127.0.0.1:9")
    with pytest.raises(ValueError, match=r"the S3 endpoint .*'http://\*\*\*@127.0.0.1:9'"):
        Store("s3://bucket/prefix")
    assert Store(str(tmp_path)).url == str(tmp_path)  # a local store does not use the endpoint


def test_store_errors_are_redacted_and_pickle_redacted():
    exc = CorruptArtifact(f"k: read from s3://{KEY_ID}:{URL_SECRET}@b failed")
    assert str(exc) == "k: read from s3://***@b failed"
    assert str(pickle.loads(pickle.dumps(exc))) == str(exc)
    assert "***" in str(StoreUnavailable(f"https://tok@host/{URL_SECRET}"))


def _leaks(*texts: str) -> list[str]:
    return [t for t in texts if any(s in t for s in (SECRET, KEY_ID, URL_SECRET))]


@pytest.fixture
def secret_s3(s3_server, monkeypatch):
    """The moto server with this module's fake credentials in the environment, fast retries."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "UNLEARNING_AUDIT_STORE_RETRIES": "2",
        "UNLEARNING_AUDIT_STORE_BACKOFF": "0.01",
    }.items():
        monkeypatch.setenv(name, value)
    filesystem("s3://trust-bucket")[0].mkdir("trust-bucket")
    return s3_server


def test_s3_store_errors_logs_and_repr_hold_no_credentials(secret_s3, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="unlearning_audit")
    caplog.set_level(logging.INFO)
    errors: list[BaseException] = []
    store = Store("s3://trust-bucket/audits", cache_dir=tmp_path / "cache")
    assert repr(store) == "Store('s3://trust-bucket/audits')"
    with pytest.raises(ValueError) as raised:  # a fresh prefix: nothing stored yet
        store.check_readable()
    assert str(raised.value) == (
        "store URL 's3://trust-bucket/audits' does not exist (nothing is stored under "
        "'trust-bucket/audits': a mistyped prefix, or no audit yet)"
    )
    errors.append(raised.value)
    with pytest.raises(ValueError, match="does not exist"):
        store.check_integrity()
    ref, _ = store.cached("evaluate", {"checkpoint": "A"}, {}, "v", _files({"s": b"x"}))
    store.check_readable()
    assert [f.key for f in store.check_integrity()] == []
    assert [m["key"] for m in store.manifests()] == [ref.key]

    nobucket = Store("s3://no-such-bucket/audits", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError) as raised:
        nobucket.check_readable()
    assert str(raised.value) == (
        "store URL 's3://no-such-bucket/audits' does not exist (no bucket 'no-such-bucket', "
        "or no access to it)"
    )
    errors.append(raised.value)
    with pytest.raises(ValueError, match="no bucket"):
        nobucket.check_integrity()
    with pytest.raises(ValueError, match="no bucket"):
        list(nobucket.manifests())
    with pytest.raises(ValueError, match="cannot be written") as raised:
        nobucket.check_writable()
    errors.append(raised.value)

    # a transient failure whose own text carries the secret: redacted, and not chained
    def leaky(*args, **kwargs):
        raise ConnectionError(f"refused by http://{KEY_ID}:{URL_SECRET}@proxy with {SECRET}")

    store.fs.ls = leaky
    with pytest.raises(ValueError, match="cannot be read") as raised:
        store.check_readable()
    errors.append(raised.value)
    assert "ConnectionError: refused by http://***@proxy with ***" in str(raised.value)
    del store.fs.ls

    secret_s3.stop()
    with pytest.raises(StoreUnavailable, match="failed after 2 attempts") as raised:
        Store("s3://trust-bucket/audits", cache_dir=tmp_path / "other").get(ref.key)
    errors.append(raised.value)
    with pytest.raises(ValueError, match="cannot be read") as raised:
        store.check_readable()
    errors.append(raised.value)
    assert "retry 1 of 1" in caplog.text
    tracebacks = ["".join(traceback.format_exception(e)) for e in errors]
    assert not _leaks(*tracebacks, caplog.text, repr(store), *map(str, errors))
