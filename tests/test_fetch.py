"""Checkpoint fetch from a local folder and from the Hugging Face hub at a pinned revision.

The hub is read offline (HF_HUB_OFFLINE=1) from a cache laid out here as huggingface_hub lays it
out: blobs, snapshots/<commit>/ links to them, and refs/main naming a commit. Every fetch records
what it saw (the spec, and the hub commit) in the artifact's manifest; identical weights get one
content hash whatever their source.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from prefect import flow
from safetensors.torch import load_file, save_file

from tasks.checkpoint import fetch_checkpoint
from unlearning_audit import checkpoints, corpus, embedded
from unlearning_audit.store import ArtifactRef, Store

MAIN = "a" * 40
OLD = "b" * 40
REPO = "org/tiny-llama"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny) -> Path:
    """A small, untrained Llama checkpoint (fetching needs no training), plus a stray file."""
    torch.manual_seed(0)
    facts = corpus.generate(0, {"text": 5, "code": 2, "math": 2})
    folder = tmp_path_factory.mktemp("model")
    tokenizer = embedded.train_tokenizer(facts, 300)
    checkpoints.save(embedded.build_model(tokenizer, tiny), tokenizer, folder)
    (folder / "README.md").write_text("not part of the checkpoint")
    return folder


def _snapshot(repo: Path, commit: str, files: dict[str, bytes]) -> None:
    """One commit of the repo in the cache: content-named blobs, and snapshot links to them."""
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture(scope="module")
def hub(tmp_path_factory, model_folder):
    """An offline hub cache: REPO at MAIN (the model as is) and OLD (another config); main->MAIN."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / f"models--{REPO.replace('/', '--')}"
    files = {p.name: p.read_bytes() for p in model_folder.iterdir()}
    _snapshot(repo, MAIN, files)
    config = json.loads(files["config.json"])
    _snapshot(
        repo, OLD, files | {"config.json": json.dumps({**config, "rms_norm_eps": 1e-5}).encode()}
    )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HUB_CACHE", str(cache))
        # huggingface_hub reads both once, at import, which happened before this fixture
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        yield repo


@flow
def _fetch(store: str, spec: str, config, allow_pickle: bool = False) -> ArtifactRef:
    return fetch_checkpoint(
        store, spec, config, allow_pickle=allow_pickle, return_state=True
    ).result()


def test_folder_and_hub_revision_give_one_content_hash_and_record_the_source(
    prefect_server, tiny, tmp_path, model_folder, hub
):
    store = Store(str(tmp_path / "store"))
    from_folder = _fetch(store.url, str(model_folder), tiny)
    from_hub = _fetch(store.url, f"{REPO}@main", tiny)
    assert from_folder.hash == from_hub.hash and from_folder.key != from_hub.key
    folder_meta = store.manifest(from_folder.key)["meta"]
    hub_meta = store.manifest(from_hub.key)["meta"]
    assert folder_meta["source"] == str(model_folder) and "commit" not in folder_meta
    assert hub_meta["source"] == f"{REPO}@main" and hub_meta["commit"] == MAIN
    assert hub_meta["inputs"]["content"] == {"repo": REPO, "commit": MAIN}
    files = set(store.manifest(from_hub.key)["files"])
    assert "README.md" not in files and {"config.json", "tokenizer.json"} <= files
    model, _ = checkpoints.load(store.local_dir(from_hub))
    assert model.config.num_hidden_layers == tiny.layers


def test_revision_is_resolved_to_its_commit_when_fetched(prefect_server, tiny, tmp_path, hub):
    """A branch is read at the commit it names now: move it, and the next fetch sees the move."""
    store = Store(str(tmp_path / "store"))
    at_main = _fetch(store.url, f"{REPO}@main", tiny)
    at_old = _fetch(store.url, f"{REPO}@{OLD}", tiny)
    assert at_old.hash != at_main.hash
    assert store.manifest(at_old.key)["meta"]["commit"] == OLD
    (hub / "refs" / "main").write_text(OLD)
    try:
        moved = _fetch(store.url, f"{REPO}@main", tiny)
    finally:
        (hub / "refs" / "main").write_text(MAIN)
    assert moved == at_old  # same commit, so the stored artifact serves it


def test_unknown_revision_offline_fails_clearly(prefect_server, tiny, tmp_path, hub):
    state = _fetch(str(tmp_path / "store"), f"{REPO}@v9", tiny, return_state=True)
    assert state.is_failed()
    with pytest.raises(LocalEntryNotFoundError, match="cached snapshot"):
        state.result()


def test_pickle_weights_beside_another_safetensors_file_are_stored_as_safetensors(
    prefect_server, tiny, tmp_path, model_folder
):
    """With allow_pickle, pickle weights are converted whatever other *.safetensors file lies
    beside them (an adapter's, which transformers does not load), so later stages load them
    without allow_pickle."""
    folder = Path(shutil.copytree(model_folder, tmp_path / "pickled"))
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    save_file({"lora_A.weight": torch.zeros(2, 2)}, folder / "adapter_model.safetensors")
    store = Store(str(tmp_path / "store"))
    ref = _fetch(store.url, str(folder), tiny, allow_pickle=True)
    files = set(store.manifest(ref.key)["files"])
    assert "model.safetensors" in files
    assert not {f for f in files if f.startswith("pytorch_model")}
    model, _ = checkpoints.load(store.local_dir(ref))
    assert model.config.num_hidden_layers == tiny.layers
