"""A checkpoint folder is an untrusted tree: every reader refuses what it must not read.

Links (to a secret outside, to a valid file outside, to a file inside), FIFOs, sockets, folders
named like a checkpoint file and oversized metadata are refused by check_folder, identity and
materialize alike, promptly and without reading them; only a hub snapshot's links into its own
repo's blobs are followed. The weights must cover the model config.json describes (and hold no
stray tensor), a hostile config.json is refused before it is built, and config.json and the
tokenizer are refused, each problem named, where they would fail later with a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import archs
import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file

from tasks._stage import _retry_condition
from unlearning_audit import checkpoints, cli, corpus, embedded
from unlearning_audit.checkpoints import CheckpointChanged
from unlearning_audit.config import AuditParams, DataConfig, UnlearnConfig
from unlearning_audit.preflight import preflight
from unlearning_audit.store import Store

SECRET = b"AWS_SECRET_ACCESS_KEY=never-copy-me-0123456789"
COMMIT = "c" * 40
REPO = "org/tiny"


@pytest.fixture(scope="module")
def published(tiny, tmp_path_factory) -> Path:
    """A small untrained Llama checkpoint (2 blocks) as someone would publish it."""
    facts = corpus.generate(0, {"text": 5, "code": 2, "math": 2})
    tokenizer = embedded.train_tokenizer(facts, 256)
    folder = tmp_path_factory.mktemp("published")
    checkpoints.save(embedded.build_model(tokenizer, tiny), tokenizer, folder)
    return folder


@pytest.fixture
def folder(published, tmp_path) -> Path:
    """A fresh copy of the published checkpoint."""
    return Path(shutil.copytree(published, tmp_path / "checkpoint"))


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "outside" / "secret.env"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def _within(seconds: float, fn: Callable, *args, **kwargs):
    """fn's result (or its exception), failing the test if it has not returned in time."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__} did not return within {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _refusal(folder: Path, **flags) -> str:
    """check_folder's message for ``folder`` (it must refuse, within 30 s)."""
    with pytest.raises(ValueError) as info:
        _within(30, checkpoints.check_folder, folder, **flags)
    message = str(info.value)
    assert message.startswith(f"checkpoint {folder}:"), message
    return message


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _nothing_secret_in(*places: Path | str) -> None:
    for place in places:
        if isinstance(place, Path):
            for path in place.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    assert SECRET not in path.read_bytes(), path
        else:
            assert SECRET.decode() not in place
            assert hashlib.sha256(SECRET).hexdigest() not in place


# -- links -----------------------------------------------------------------------------------

NAMES = ["config.json", "model.safetensors", "tokenizer.json"]


def _link(folder: Path, name: str, target: str, secret: Path) -> None:
    """Replace ``name`` with a link: to the secret, to a sound copy of the file outside the
    folder, or to a sound copy inside it."""
    if target == "secret":
        to = secret
    elif target == "copy-outside":
        to = secret.parent / name
        shutil.copyfile(folder / name, to)
    else:
        to = folder / f"real-{name}"
        shutil.copyfile(folder / name, to)
    (folder / name).unlink()
    (folder / name).symlink_to(to)


@pytest.mark.parametrize("target", ["secret", "copy-outside", "inside"])
@pytest.mark.parametrize("name", NAMES)
def test_a_link_is_refused_by_every_reader(folder, secret, tmp_path, name, target):
    _link(folder, name, target, secret)
    message = _refusal(folder)
    assert f"{name} is a symbolic link (to " in message
    assert "a checkpoint folder must hold its files, not links to them" in message
    assert "(copy the folder with cp -rL to resolve its links)" in message
    spec = checkpoints.parse(str(folder))
    with pytest.raises(ValueError, match=f"{name} is a symbolic link") as info:
        checkpoints.identity(spec)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ValueError, match=f"{name} is a symbolic link") as copied:
        checkpoints.materialize(spec, dest, expected={})
    assert list(dest.iterdir()) == []  # refused before anything is copied
    _nothing_secret_in(dest, message, str(info.value), str(copied.value))


def test_a_file_url_is_read_as_a_local_folder_links_refused(folder, secret, tmp_path):
    _link(folder, "config.json", "secret", secret)
    spec = checkpoints.parse(f"file://{folder}")
    assert spec.kind == "remote"
    dest = tmp_path / "dest"
    dest.mkdir()
    for call in (
        lambda: checkpoints.identity(spec),
        lambda: checkpoints.materialize(spec, dest, expected={}),
    ):
        with pytest.raises(ValueError, match=r"config\.json is a symbolic link"):
            call()
    _nothing_secret_in(dest)


def _entry(folder: Path, name: str, kind: str, secret: Path) -> socket.socket | None:
    """Add an entry that is no regular file: a link to the secret, a link to a sibling folder,
    a FIFO or a socket (returned, to be closed)."""
    if kind == "link":
        (folder / name).symlink_to(secret)
    elif kind == "folder-link":
        (folder / "checkpoint-500").mkdir()
        (folder / name).symlink_to("checkpoint-500", target_is_directory=True)
    elif kind == "fifo":
        os.mkfifo(folder / name)
    else:
        (folder / name).touch()
        return _socket(folder, name)
    return None


ENTRIES = [  # name, kind, allow_pickle, refused: only entries named like a checkpoint's files
    ("README.md", "link", False, False),
    ("latest", "folder-link", False, False),
    ("logs", "socket", False, False),
    ("notes", "fifo", False, False),
    ("pytorch_model.bin", "fifo", False, False),  # pickle weights not allowed: never read
    ("pytorch_model.bin", "fifo", True, True),
    ("modeling_evil.py", "link", False, True),  # model code is in every identity
    ("special_tokens_map.json", "link", False, True),
    ("model-00002-of-00002.safetensors", "socket", False, True),
]


@pytest.mark.parametrize(
    ("name", "kind", "allow_pickle", "refused"),
    ENTRIES,
    ids=[f"{n}-{k}{'-pickle' if p else ''}" for n, k, p, _ in ENTRIES],
)
def test_every_reader_refuses_by_one_rule_given_as_a_path_or_a_url(
    folder, secret, tmp_path, name, kind, allow_pickle, refused
):
    """check_folder, identity and materialize agree, for the folder and its file:// URL."""
    made = _entry(folder, name, kind, secret)
    calls = {"check_folder": lambda: checkpoints.check_folder(folder, allow_pickle)}
    for how, spec in (("path", str(folder)), ("url", f"file://{folder}")):
        parsed = checkpoints.parse(spec)
        dest = tmp_path / how
        dest.mkdir()
        calls[f"identity({how})"] = lambda p=parsed: checkpoints.identity(p, allow_pickle)
        calls[f"materialize({how})"] = lambda p=parsed, d=dest: checkpoints.materialize(
            p, d, allow_pickle, expected={} if refused else checkpoints.identity(p, allow_pickle)
        )
    try:
        for run in calls.values():
            if refused:
                with pytest.raises(ValueError, match=f"{name} is ") as info:
                    _within(30, run)
                _nothing_secret_in(str(info.value))
            else:
                _within(30, run)
    finally:
        if made is not None:
            made.close()
    for how in ("path", "url"):
        assert name not in {p.name for p in (tmp_path / how).iterdir()}
        _nothing_secret_in(tmp_path / how)


def test_a_linked_subfolder_named_like_a_checkpoint_file_is_refused(folder, secret):
    (folder / "original").symlink_to(secret.parent, target_is_directory=True)  # never read
    (folder / "model-00001-of-00002.safetensors").symlink_to(secret.parent)
    message = _refusal(folder)
    assert "original" not in message
    assert f"{folder}: model-00001-of-00002.safetensors is a symbolic link (to " in message


def test_a_local_hub_snapshot_is_refused_with_the_way_to_give_it(folder, tmp_path):
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / COMMIT
    _hub_layout(folder, snapshot.parent.parent)
    message = _refusal(snapshot)
    assert "config.json is a symbolic link (to ../../blobs/" in message
    assert "give the checkpoint as org/name@<commit> instead" in message


# -- FIFOs, sockets, folders, sizes ----------------------------------------------------------


def _fifo(folder: Path, name: str) -> None:
    (folder / name).unlink()
    os.mkfifo(folder / name)


def _socket(folder: Path, name: str) -> socket.socket:
    (folder / name).unlink()
    sock = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(folder)  # a relative name: the full path may be longer than a socket's path allows
    try:
        sock.bind(name)
    finally:
        os.chdir(cwd)
    return sock


def _directory(folder: Path, name: str) -> None:
    (folder / name).unlink()
    (folder / name).mkdir()


FIFO_REFUSED = r"config.json is a FIFO \(named pipe\), not a regular file"
SPECIAL = [
    ("config.json", _fifo, "a FIFO (named pipe)"),
    ("model.safetensors", _fifo, "a FIFO (named pipe)"),
    ("tokenizer.json", _fifo, "a FIFO (named pipe)"),
    ("tokenizer_config.json", _fifo, "a FIFO (named pipe)"),
    ("config.json", _socket, "a socket"),
    ("config.json", _directory, "a folder"),
    ("model.safetensors", _directory, "a folder"),
]


@pytest.mark.parametrize(
    ("name", "make", "kind"), SPECIAL, ids=[f"{n}-{m.__name__[1:]}" for n, m, _ in SPECIAL]
)
def test_a_special_file_is_refused_promptly_without_being_opened(
    folder, tmp_path, name, make, kind
):
    made = make(folder, name)
    try:
        message = _refusal(folder)
        assert f"{name} is {kind}, not a regular file" in message
        spec = checkpoints.parse(str(folder))
        dest = tmp_path / "dest"
        dest.mkdir()
        with pytest.raises(ValueError, match=f"{name} is .*, not a regular file"):
            _within(30, checkpoints.identity, spec)
        with pytest.raises(ValueError, match=f"{name} is .*, not a regular file"):
            _within(30, checkpoints.materialize, spec, dest, expected={})
    finally:
        if made is not None:
            made.close()


def test_a_file_swapped_for_a_fifo_after_the_listing_is_refused(folder):
    tree = checkpoints._Tree(folder)  # listed while config.json was a regular file
    _fifo(folder, "config.json")
    with pytest.raises(ValueError, match=FIFO_REFUSED):
        _within(30, tree.read, "config.json")


@pytest.mark.parametrize("swap", ["link", "other-file"])
def test_a_file_swapped_between_its_check_and_its_open_is_refused(
    folder, secret, monkeypatch, swap
):
    """The file is checked (lstat) and then opened: a swap in between, for a link or for
    another regular file, is caught by the open (no link followed) or by the descriptor's
    identity (not the file that was checked)."""
    real_open = os.open

    def open_after_a_swap(path, flags, *args, **kwargs):
        if Path(path).name == "config.json" and not swapped:
            swapped.append(path)
            os.rename(path, f"{path}.old")  # kept: its inode is not reused
            if swap == "link":
                os.symlink(secret, path)
            else:
                shutil.copyfile(secret, path)
        return real_open(path, flags, *args, **kwargs)

    swapped: list = []
    monkeypatch.setattr(os, "open", open_after_a_swap)
    message = _refusal(folder)
    expected = {
        "link": "config.json cannot be opened (Too many levels of symbolic links)",
        "other-file": "config.json was replaced while it was being opened",
    }
    assert expected[swap] in message
    _nothing_secret_in(message)


def test_names_are_shown_escaped(folder, secret):
    (folder / "\x1b[2Jevil.safetensors").symlink_to(secret)
    message = _refusal(folder)
    assert "\x1b" not in message
    assert "'\\x1b[2Jevil.safetensors' is a symbolic link" in message


@pytest.mark.parametrize(
    "name", ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
)
def test_oversized_metadata_is_refused_with_its_size_before_it_is_read(folder, tmp_path, name):
    with open(folder / name, "ab") as f:
        f.truncate(100 * 2**20)  # sparse: no time, no disk
    started = time.monotonic()
    message = _refusal(folder)
    assert f"{name} is 100.0 MiB, over the 64 MiB limit for checkpoint metadata" in message
    spec = checkpoints.parse(str(folder))
    with pytest.raises(ValueError, match=f"{name} is 100.0 MiB, over the 64 MiB limit"):
        checkpoints.identity(spec)
    (tmp_path / "dest").mkdir()
    with pytest.raises(ValueError, match=f"{name} is 100.0 MiB"):
        checkpoints.materialize(spec, tmp_path / "dest", expected={})
    assert time.monotonic() - started < 10


def test_metadata_grown_after_it_was_checked_is_refused_when_read(folder):
    tree = checkpoints._Tree(folder)
    with open(folder / "config.json", "ab") as f:
        f.truncate(checkpoints.METADATA_LIMIT + 1)
    with pytest.raises(ValueError, match=r"config\.json is 64\.0 MiB, over the 64 MiB limit"):
        tree.read("config.json")


# -- the hub ---------------------------------------------------------------------------------


def _hub_layout(folder: Path, repo: Path) -> Path:
    """The checkpoint as one commit of a hub cache: content-named blobs, snapshot links."""
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for path in sorted(folder.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub(folder, tmp_path, monkeypatch) -> Path:
    """An offline hub cache holding the checkpoint as REPO at COMMIT; its snapshot folder."""
    cache = tmp_path / "hf-cache"
    snapshot = _hub_layout(folder, cache / f"models--{REPO.replace('/', '--')}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return snapshot


def _fetch_hub(tmp_path: Path) -> tuple[dict, Path]:
    dest = tmp_path / "dest"
    dest.mkdir()
    spec = checkpoints.pin(checkpoints.parse(f"{REPO}@main"))
    return _within(30, checkpoints.materialize, spec, dest, expected={}), dest


def test_hub_snapshot_links_into_its_blobs_are_followed(hub, folder, tmp_path):
    provenance, dest = _fetch_hub(tmp_path)
    assert provenance == {"commit": COMMIT}
    copied = sorted(p.name for p in dest.iterdir())
    assert copied == sorted(p.name for p in folder.iterdir())
    for path in dest.iterdir():
        assert path.is_file() and not path.is_symlink()
        assert path.read_bytes() == (folder / path.name).read_bytes()
    checkpoints.check_folder(dest)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_hub_snapshot_link_out_of_its_repo_is_refused(hub, secret, tmp_path, name):
    (hub / name).unlink()
    (hub / name).symlink_to(secret)
    with pytest.raises(ValueError, match=f"{name} is a link out of its hub repo's cache folder"):
        _fetch_hub(tmp_path)
    _nothing_secret_in(tmp_path / "dest")


def test_hub_snapshot_link_to_a_fifo_blob_is_refused_promptly(hub, tmp_path):
    blob = hub.parent.parent / "blobs" / "fifo"
    os.mkfifo(blob)
    (hub / "config.json").unlink()
    (hub / "config.json").symlink_to(os.path.relpath(blob, hub))
    with pytest.raises(ValueError, match=FIFO_REFUSED):
        _fetch_hub(tmp_path)


# -- what is hashed is what is copied --------------------------------------------------------


def test_an_s3_copy_is_what_identity_saw_and_metadata_is_bounded(
    s3_server, folder, tmp_path, monkeypatch
):
    from unlearning_audit.store import filesystem

    fs, _ = filesystem("s3://models")
    fs.mkdir("models")
    for path in folder.iterdir():
        fs.put_file(str(path), f"models/tiny/{path.name}")
    spec = checkpoints.parse("s3://models/tiny")
    known = checkpoints.identity(spec)
    (tmp_path / "a").mkdir()
    checkpoints.materialize(spec, tmp_path / "a", expected=known)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        p.name for p in folder.iterdir()
    )
    fs.pipe("models/tiny/config.json", b"{}")
    (tmp_path / "b").mkdir()
    with pytest.raises(CheckpointChanged, match=r"config\.json \(ETag differs\)"):
        checkpoints.materialize(spec, tmp_path / "b", expected=known)
    monkeypatch.setattr(checkpoints.tree, "METADATA_LIMIT", 1000)
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match=r"tokenizer\.json is [0-9.]+ MiB, over the 0 MiB limit"):
        checkpoints.materialize(spec, tmp_path / "c", expected=checkpoints.identity(spec))
    assert list((tmp_path / "c").iterdir()) == []  # refused before anything is downloaded


def test_an_s3_file_overwritten_while_it_is_copied_is_refused(
    s3_server, folder, tmp_path, monkeypatch
):
    """The ETag listed before the download must still be the object's once it is copied."""
    from unlearning_audit.store import filesystem

    fs, _ = filesystem("s3://overwritten")
    fs.mkdir("overwritten")
    for path in folder.iterdir():
        fs.put_file(str(path), f"overwritten/tiny/{path.name}")
    spec = checkpoints.parse("s3://overwritten/tiny")
    known = checkpoints.identity(spec)
    opened = fs.open

    def overwrite_then_open(remote, mode="rb", **kwargs):
        if remote.endswith("/config.json"):  # the same size, other bytes
            fs.pipe_file(remote, fs.cat_file(remote)[::-1])
        return opened(remote, mode, **kwargs)

    monkeypatch.setattr(fs, "open", overwrite_then_open)
    with pytest.raises(CheckpointChanged, match=r"config\.json changed while it was copied"):
        checkpoints.materialize(spec, tmp_path, expected=known)


@pytest.fixture
def memory(folder, tmp_path):
    """The checkpoint on a backend that lists no ETag (fsspec's memory file system)."""
    from unlearning_audit.store import filesystem

    fs, root = filesystem(f"memory://{tmp_path.name}/tiny")
    for path in folder.iterdir():
        fs.pipe_file(f"{root}/{path.name}", path.read_bytes())
    yield fs, root
    fs.rm(root, recursive=True)


def test_a_checkpoint_without_etags_is_known_by_its_hashes(memory, folder, tmp_path):
    fs, root = memory
    spec = checkpoints.parse(f"memory://{root.strip('/')}")
    known = checkpoints.identity(spec)
    assert known == checkpoints.identity(checkpoints.parse(str(folder)))  # not size and mtime
    (tmp_path / "a").mkdir()
    checkpoints.materialize(spec, tmp_path / "a", expected=known)
    config = fs.cat_file(f"{root}/config.json")
    fs.pipe_file(f"{root}/config.json", config[::-1])  # the same size, other bytes
    (tmp_path / "b").mkdir()
    with pytest.raises(CheckpointChanged, match=r"config\.json \(sha256 differs\)"):
        checkpoints.materialize(spec, tmp_path / "b", expected=known)


@pytest.mark.parametrize("key", ["ETag", "etag", "Etag"])
def test_a_remote_etag_is_read_however_its_backend_spells_it(memory, key, monkeypatch):
    fs, root = memory
    listed = fs.ls

    def with_etags(path, detail=True, **kwargs):
        return [i | {key: f'"{i["name"]}-v1"'} for i in listed(path, detail=True, **kwargs)]

    monkeypatch.setattr(fs, "ls", with_etags)
    known = checkpoints.identity(checkpoints.parse(f"memory://{root.strip('/')}"))
    assert known["config.json"] == f'"{root}/config.json-v1"'


@pytest.mark.parametrize("change", ["changed", "added", "removed"])
def test_a_file_changed_between_identity_and_copy_is_refused(folder, tmp_path, change):
    spec = checkpoints.parse(str(folder))
    known = checkpoints.identity(spec)
    if change == "changed":
        _edit_config(folder, rms_norm_eps=1e-5)
        expected = "config.json (sha256 differs)"
    elif change == "added":
        (folder / "special_tokens_map.json").write_text("{}")
        expected = "special_tokens_map.json (added)"
    else:
        (folder / "generation_config.json").unlink()
        expected = "generation_config.json (removed)"
    (tmp_path / "dest").mkdir()
    with pytest.raises(
        CheckpointChanged, match="changed between its identity and its copy"
    ) as info:
        checkpoints.materialize(spec, tmp_path / "dest", expected=known)
    assert expected in str(info.value)
    assert not isinstance(info.value, ValueError)  # not bad input: the fetch stage retries it
    assert _retry_condition(None, None, SimpleNamespace(data=info.value))


def test_the_copy_matches_the_identity_it_is_given(folder, tmp_path):
    spec = checkpoints.parse(str(folder))
    known = checkpoints.identity(spec)
    dest = tmp_path / "dest"
    dest.mkdir()
    checkpoints.materialize(spec, dest, expected=known)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in dest.iterdir()} == known
    with pytest.raises(CheckpointChanged, match=r"config.json \(sha256 differs\)"):
        checkpoints.materialize(spec, tmp_path, expected=known | {"config.json": "0" * 64})


# -- the weights must cover the model --------------------------------------------------------


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _save_tensors(folder: Path, tensors: dict[str, torch.Tensor], name="model.safetensors"):
    save_file(tensors, folder / name, metadata={"format": "pt"})


def _extra_layer_and_stray_file(folder: Path) -> None:
    _edit_config(folder, num_hidden_layers=3)
    _save_tensors(folder, {"unrelated.weight": torch.zeros(4)}, "extra.safetensors")


def _missing_norm(folder: Path) -> None:
    tensors = _tensors(folder)
    del tensors["model.norm.weight"]
    _save_tensors(folder, tensors)


def _missing_tensor_in_a_stray_file(folder: Path) -> None:
    """The missing tensor sits in another file, which transformers does not load."""
    tensors = _tensors(folder)
    name = "model.layers.1.mlp.down_proj.weight"
    _save_tensors(folder, {name: tensors.pop(name)}, "extra.safetensors")
    _save_tensors(folder, tensors)


def _stray_tensor(folder: Path) -> None:
    _save_tensors(folder, _tensors(folder) | {"extra.weight": torch.zeros(3)})


def _renamed_tensor(folder: Path) -> None:
    tensors = _tensors(folder)
    tensors["model.norm.scale"] = tensors.pop("model.norm.weight")
    _save_tensors(folder, tensors)


def _index_shard_outside(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    names = list(load_file(folder / "model-00001-of-00001.safetensors"))
    weight_map = dict.fromkeys(names, "model-00001-of-00001.safetensors")
    weight_map[names[0]] = "../outside.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _weights_named_outside(folder: Path) -> None:
    _edit_config(folder, transformers_weights="../model.safetensors")


def _weights_named_in_config(folder: Path) -> None:
    _save_tensors(folder, {"unrelated.weight": torch.zeros(4)}, "extra.safetensors")
    _edit_config(folder, transformers_weights="extra.safetensors")


UNCOVERED = [
    (
        "extra-layer-stray-file",
        _extra_layer_and_stray_file,
        "config.json describes 3 layers, the weights hold 2; config.json describes parameters "
        "no *.safetensors file holds: model.layers.2.*",
    ),
    (
        "missing-tensor",
        _missing_norm,
        "config.json describes parameters no *.safetensors file holds: model.norm.weight",
    ),
    (
        "missing-tensor-in-unloaded-file",
        _missing_tensor_in_a_stray_file,
        "config.json describes parameters no *.safetensors file holds: "
        "model.layers.1.mlp.down_proj.weight",
    ),
    (
        "stray-tensor",
        _stray_tensor,
        "model.safetensors holds tensors that are no parameter of the model config.json "
        "describes: extra.weight",
    ),
    (
        "renamed-tensor",
        _renamed_tensor,
        "model.safetensors holds tensors that are no parameter of the model config.json "
        "describes: model.norm.scale\n    - config.json describes parameters no *.safetensors "
        "file holds: model.norm.weight",
    ),
    (
        "index-shard-outside",
        _index_shard_outside,
        "model.safetensors.index.json names shards outside the folder: ../outside.safetensors",
    ),
    (
        "weights-named-outside",
        _weights_named_outside,
        "config.json: transformers_weights must name a *.safetensors file or index in the "
        "folder, not '../model.safetensors'",
    ),
    (
        "weights-named-in-config",
        _weights_named_in_config,
        "config.json describes 2 layers, more than the 1 tensor(s) the weights hold; not built",
    ),
]


@pytest.mark.parametrize(
    ("damage", "expected"), [c[1:] for c in UNCOVERED], ids=[c[0] for c in UNCOVERED]
)
def test_weights_that_do_not_cover_the_model_are_refused(folder, damage, expected):
    damage(folder)
    assert expected in _refusal(folder)


LOADED = [  # the files in the folder, config.json's settings, the file transformers loads
    ({"model.safetensors", "adapter_model.safetensors"}, {}, "model.safetensors"),
    (
        {"model.safetensors.index.json", "model-00001-of-00001.safetensors"},
        {},
        "model.safetensors.index.json",
    ),
    (
        {"model.safetensors", "extra.safetensors"},
        {"transformers_weights": "extra.safetensors"},
        "extra.safetensors",
    ),
    ({"pytorch_model.bin", "adapter_model.safetensors"}, {}, None),
    ({"pytorch_model-00001-of-00002.bin", "model-00001-of-00002.safetensors"}, {}, None),
]


@pytest.mark.parametrize(("files", "settings", "loaded"), LOADED)
def test_the_safetensors_transformers_loads_are_told_by_one_rule(tmp_path, files, settings, loaded):
    """Pickle weights beside a *.safetensors file transformers does not load (an adapter's, a
    shard without its index) are still the weights: the fetch stage converts them."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"} | settings))
    for name in files:
        (tmp_path / name).touch()
    assert checkpoints.safetensors_weights(tmp_path) == loaded


def test_load_refuses_parameters_transformers_reports_missing(folder, monkeypatch):
    """The second line: were a missing tensor to pass check_folder (a rename it cannot follow),
    load refuses what transformers reports missing instead of leaving it random."""
    _missing_norm(folder)
    monkeypatch.setattr(checkpoints.checks, "_coverage_problems", lambda config, tensors: [])
    checkpoints.check_folder(folder)
    with pytest.raises(ValueError) as info:
        checkpoints.load(folder)
    assert str(info.value) == (
        f"checkpoint {folder}: the weights leave parameters of the model config.json describes "
        "unset (transformers would fill them with random values): model.norm.weight"
    )


@pytest.fixture(scope="module")
def arch_tokenizer():
    return archs.tokenizer([f"Author {i} wrote the book of {w}." for i, w in enumerate("abc")] * 4)


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_sound_checkpoints_of_real_architectures_pass_and_load(arch, arch_tokenizer, tmp_path):
    folder = archs.save(archs.model(arch, arch_tokenizer), arch_tokenizer, tmp_path / arch)
    checkpoints.check_folder(folder)
    model, tokenizer = checkpoints.load(folder)
    assert tokenizer.is_fast and model.config.num_hidden_layers == 2
    assert checkpoints.num_blocks(folder) == 2


def test_gpt2_keys_as_transformers_renames_them_pass(arch_tokenizer, tmp_path):
    """A GPT-2 checkpoint in the original layout (no base-model prefix, no lm_head: it is tied;
    the causal mask saved as a buffer) passes: transformers loads it as it is."""
    folder = archs.save(archs.model("gpt2", arch_tokenizer), arch_tokenizer, tmp_path / "gpt2")
    tensors = {
        name.removeprefix("transformer."): tensor
        for name, tensor in _tensors(folder).items()
        if name != "lm_head.weight"
    }
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 8, 8)
    _save_tensors(folder, tensors)
    checkpoints.check_folder(folder)
    model, _ = checkpoints.load(folder)
    assert model.lm_head.weight is model.transformer.wte.weight


# -- a hostile config.json is refused before it is built -------------------------------------


@pytest.mark.parametrize("layers", [20000, 10**12])
def test_a_config_with_absurdly_many_layers_is_refused_fast(folder, layers):
    _edit_config(folder, num_hidden_layers=layers)
    started = time.monotonic()
    message = _refusal(folder)
    assert time.monotonic() - started < 2
    assert (
        f"config.json describes {layers} layers, the weights hold 2; config.json describes "
        "parameters no *.safetensors file holds: model.layers.2.*; model.layers.3.*; "
        f"model.layers.4.* (and {layers - 5} more)"
    ) in message


def _empty_tensors(folder: Path, layers: int) -> None:
    """Two empty tensors per layer under junk names: as many tensors as the layers need to pass
    a bound by the count of tensors, and no elements."""
    _save_tensors(
        folder, {f"model.layers.{i}.{n}": torch.zeros(0) for i in range(layers) for n in "ab"}
    )


def _one_element_tensors(folder: Path, layers: int) -> None:
    """Every parameter of every layer under its own name, of one element each."""
    names = [n.removeprefix("model.layers.0.") for n in _tensors(folder) if ".layers.0." in n]
    _save_tensors(
        folder, {f"model.layers.{i}.{n}": torch.zeros(1) for i in range(layers) for n in names}
    )


@pytest.mark.parametrize(
    ("fill", "layers"), [(_empty_tensors, 20000), (_one_element_tensors, 5000)]
)
def test_weights_too_small_for_the_model_bound_its_build_whatever_their_count(folder, fill, layers):
    """Unbounded, the build takes time and memory by the layer (20,000: 35 s and 870 MB)."""
    _edit_config(folder, num_hidden_layers=layers)
    fill(folder, layers)
    started = time.monotonic()
    message = _refusal(folder)
    assert time.monotonic() - started < 2
    assert "config.json describes a model of more than " in message
    assert " parameter elements, more than the weights (" in message
    assert "could fill; not built" in message


def test_a_model_build_is_bounded_by_the_weights_in_its_own_thread_only():
    built = []

    def other_thread():
        built.append(torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(100))))

    with checkpoints._bounded_build(50, 10**6):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        with pytest.raises(checkpoints._TooLarge, match="more than 50 parameters and modules"):
            torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(100)))
    too_many = pytest.raises(checkpoints._TooLarge, match="more than 100 parameter elements")
    with checkpoints._bounded_build(10**6, 100), too_many:
        torch.nn.Linear(10, 10)
    assert len(built) == 1
    torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(100)))  # the hooks are gone


# -- config.json and the tokenizer, refused where they would fail later ----------------------


def _write(name: str, text: str) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        (folder / name).write_text(text)

    return write


def _config(**changes) -> Callable[[Path], None]:
    return lambda folder: _edit_config(folder, **changes)


def _without_model_type(folder: Path) -> None:
    settings = json.loads((folder / "config.json").read_text())
    del settings["model_type"]
    (folder / "config.json").write_text(json.dumps(settings))


def _tokenizer_config(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "tokenizer_config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | changes))

    return edit


def _tokenizer_model(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        spec = json.loads((folder / "tokenizer.json").read_text())
        spec["model"] |= changes
        (folder / "tokenizer.json").write_text(json.dumps(spec))

    return edit


MALFORMED = [
    ("config-list", _write("config.json", "[1, 2]"), "config.json is not a JSON object"),
    (
        "config-deep",
        _write("config.json", "[" * 100_000 + "]" * 100_000),
        "config.json is not valid JSON (nested too deeply)",
    ),
    (
        "layers-string",
        _config(num_hidden_layers="two"),
        "config.json: num_hidden_layers must be a whole number of at least 0, not 'two'",
    ),
    (
        "layers-bool",
        _config(num_hidden_layers=True),
        "config.json: num_hidden_layers must be a whole number of at least 0, not True",
    ),
    (
        "layers-negative",
        _config(num_hidden_layers=-1),
        "config.json: num_hidden_layers must be a whole number of at least 0, not -1",
    ),
    (
        "layers-twice",
        lambda folder: (folder / "config.json").write_text(
            json.dumps({"model_type": "gpt2", "n_layer": 2, "num_hidden_layers": 5})
        ),
        "config.json states the number of layers twice, differently: n_layer 2, "
        "num_hidden_layers 5",
    ),
    (
        "architectures-number",
        _config(architectures=5),
        "config.json: architectures must be a list of class names, not 5",
    ),
    (
        "no-model-type",
        _without_model_type,
        "config.json has no model_type (which architecture the model is)",
    ),
    (
        "unknown-model-type",
        _config(model_type="sentient"),
        "config.json: model_type 'sentient' is not one transformers knows",
    ),
    (
        "zero-heads",
        _config(num_attention_heads=0),
        "config.json is not a valid LlamaConfig (ZeroDivisionError: integer modulo by zero)",
    ),
    (
        "quantized",
        _config(quantization_config={"quant_method": "gptq", "bits": 4}),
        "config.json has a quantization_config (quant_method 'gptq'): quantized checkpoints are "
        "not supported; give the unquantized weights",
    ),
    (
        "hub-kernel",
        _config(attn_implementation="kernels-community/flash-attn"),
        "config.json asks for kernel code from the hub (attn_implementation "
        "'kernels-community/flash-attn'); refused unless explicitly allowed (--trust-remote-code)",
    ),
    (
        "tokenizer-auto-map",
        _tokenizer_config(auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}),
        "tokenizer_config.json needs trust_remote_code (auto_map ['AutoTokenizer']); refused "
        "unless explicitly allowed (--trust-remote-code)",
    ),
    (
        "tokenizer-not-json",
        _write("tokenizer.json", "{'model': 1}"),
        "tokenizer.json is not valid JSON (",
    ),
    ("tokenizer-list", _write("tokenizer.json", "[]"), "tokenizer.json is not a JSON object"),
    (
        "tokenizer-no-model",
        _write("tokenizer.json", '{"version": "1.0"}'),
        "tokenizer.json has no model (its vocabulary and algorithm)",
    ),
    (
        "tokenizer-unknown-model",
        _tokenizer_model(type="Oracle"),
        "the tokenizer does not load (Exception: data did not match any variant of untagged "
        "enum ModelUntagged",
    ),
    (
        "tokenizer-config-list",
        _write("tokenizer_config.json", "[]"),
        "tokenizer_config.json is not a JSON object",
    ),
]


@pytest.mark.parametrize(
    ("damage", "expected"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_a_malformed_config_or_tokenizer_is_a_problem_line_not_a_traceback(
    folder, damage, expected
):
    damage(folder)
    message = _refusal(folder)
    assert expected in message
    assert "\n" not in message  # that problem alone: nothing else fails because of it


@pytest.mark.parametrize(
    "value", ["/etc/passwd", "../outside/tokenizer.json", "sub/tokenizer.json", "..", "a\\b", 5]
)
@pytest.mark.parametrize("key", ["tokenizer_file", "vocab_file", "merges_file", "sp_model_file"])
def test_a_tokenizer_file_setting_outside_the_folder_is_refused(folder, key, value):
    """transformers 4 opens a *_file path of tokenizer_config.json as it is given."""
    _tokenizer_config(**{key: value})(folder)
    message = _refusal(folder)
    expected = f"tokenizer_config.json: {key} must be null or a file name in the folder, not "
    assert expected in message
    assert "\n" not in message


def test_a_tokenizer_file_setting_naming_a_file_in_the_folder_passes(folder):
    _tokenizer_config(tokenizer_file="tokenizer.json", vocab_file=None)(folder)
    checkpoints.check_folder(folder)


def test_the_tokenizer_is_loaded_from_an_owned_scratch_folder(folder, tmp_path, monkeypatch):
    """Owned (scratch.folder): removed afterwards, and after a kill by the next start."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("UNLEARNING_AUDIT_TMP", str(tmp_path / "scratch"))
    loaded_from, real = [], AutoTokenizer.from_pretrained

    def spy(path, **kwargs):
        loaded_from.append(Path(path))
        return real(path, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    checkpoints.check_folder(folder)
    (used,) = loaded_from
    assert used.parent == tmp_path / "scratch"
    assert used.name.startswith(f"ua-tokenizer-{os.getpid()}-")
    assert not used.exists()


def test_num_blocks_is_what_config_json_declares(folder, tmp_path):
    assert checkpoints.num_blocks(folder) == 2
    for settings, blocks in (
        ({"model_type": "gpt2", "n_layer": 5}, 5),
        ({"model_type": "llava", "text_config": {"num_hidden_layers": 7}}, 7),
        ({"model_type": "llama"}, None),
    ):
        (folder / "config.json").write_text(json.dumps(settings))
        assert checkpoints.num_blocks(folder) == blocks
    assert checkpoints.num_blocks(tmp_path) is None  # no config.json: check_folder says so
    for text, message in (
        ('{"model_type": "llama", "num_hidden_layers": "two"}', "num_hidden_layers must be"),
        ("[2]", "config.json is not a JSON object"),
        ("{", "config.json is not valid JSON"),
    ):
        (folder / "config.json").write_text(text)
        with pytest.raises(ValueError, match=f"^checkpoint {folder}: ") as info:
            checkpoints.num_blocks(folder)
        assert message in str(info.value)
    _fifo(folder, "config.json")
    with pytest.raises(ValueError, match=FIFO_REFUSED):
        _within(10, checkpoints.num_blocks, folder)


# -- through preflight and the command line --------------------------------------------------


def test_preflight_refuses_a_linked_config_before_any_stage(folder, secret, data_files, tmp_path):
    _link(folder, "config.json", "secret", secret)
    params = AuditParams(
        original=str(folder),
        methods=[UnlearnConfig(method="GA")],
        data=DataConfig(**data_files),
        store=str(tmp_path / "store"),
    )
    with pytest.raises(ValueError) as info:
        preflight(params)
    assert f"original: checkpoint {folder}: config.json is a symbolic link (to {secret})" in str(
        info.value
    )
    _nothing_secret_in(str(info.value))
    assert not (tmp_path / "store").exists() or list(Store(params.store).manifests()) == []


def test_the_cli_refuses_a_fifo_and_a_hostile_config_promptly(
    folder, published, data_files, tmp_path, capsys
):
    _fifo(folder, "model.safetensors")
    unlearned = Path(shutil.copytree(published, tmp_path / "unlearned"))
    _edit_config(unlearned, num_hidden_layers=20000)
    argv = ["audit", "--original", str(folder), "--unlearned", str(unlearned)]
    argv += ["--forget", data_files["forget"], "--retain", data_files["retain"]]
    code = _within(60, cli.main, [*argv, "--store", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == 2
    refused = "model.safetensors is a FIFO (named pipe), not a regular file"
    assert f"original: checkpoint {folder}: {refused}" in err
    assert f"unlearned: checkpoint {unlearned}: config.json describes 20000 layers" in err
    assert list(Store(str(tmp_path / "store")).manifests()) == []
