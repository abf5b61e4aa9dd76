"""Checkpoints: where they come from, how they are checked, loaded and saved.

A checkpoint spec is one of:

* ``embedded``: the built-in tiny model (built by the fetch stage, see embedded.py);
* a local folder holding a Hugging Face causal LM;
* ``s3://bucket/prefix`` (or any fsspec URL) holding the same files;
* a hub id pinned to a revision, ``org/name@revision`` (resolved to its commit; works offline
  from the local Hugging Face cache with HF_HUB_OFFLINE=1).

A fetched checkpoint is known by its content: ``identity`` names what it is before it is copied
(file hashes, S3 ETags, or the hub commit) and ``materialize`` copies exactly that.

Untrusted by default: weights load from safetensors only, and a config that needs
``trust_remote_code`` is refused; both can be allowed explicitly.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from .store import file_sha256, filesystem

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
WEIGHTS = ("*.safetensors", "*.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model*.bin", "pytorch_model*.bin.index.json")
METADATA = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+@[\w./-]+$")


@dataclass(frozen=True)
class CheckpointSpec:
    """A parsed checkpoint spec (see the module docstring)."""

    kind: Literal["embedded", "local", "remote", "hub"]
    location: str
    revision: str | None = None


def parse(spec: str) -> CheckpointSpec:
    """Parse a checkpoint spec; a local path that does not exist is an error naming it."""
    spec = spec.strip()
    if spec == EMBEDDED:
        return CheckpointSpec("embedded", EMBEDDED)
    if "://" in spec:
        return CheckpointSpec("remote", spec.rstrip("/"))
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"checkpoint {spec!r} is a file; give the folder that holds it")
        return CheckpointSpec("local", str(path.resolve()))
    if _HUB_ID.match(spec):
        repo, revision = spec.split("@", 1)
        return CheckpointSpec("hub", repo, revision)
    if "/" in spec and "@" not in spec and not spec.startswith((".", "/", "~")):
        raise ValueError(
            f"checkpoint {spec!r}: a hub id needs a pinned revision, e.g. {spec}@main or "
            f"{spec}@<commit>; no local folder of that name exists either"
        )
    raise ValueError(f"checkpoint path {spec!r} does not exist")


def wanted(name: str, allow_pickle: bool) -> bool:
    """Whether a checkpoint file is copied: weights (pickle only if allowed) and metadata."""
    return any(Path(name).match(p) for p in _patterns(allow_pickle))


def _patterns(allow_pickle: bool) -> tuple[str, ...]:
    return WEIGHTS + METADATA + (PICKLE_WEIGHTS if allow_pickle else ())


def pin(spec: CheckpointSpec) -> CheckpointSpec:
    """A hub spec with its revision resolved to the commit it names now; others unchanged.

    Fetching the pinned spec copies exactly that commit, even if the branch moves meanwhile.
    """
    if spec.kind != "hub":
        return spec
    return replace(spec, revision=_snapshot(spec, ("config.json",)).name)


def _snapshot(spec: CheckpointSpec, patterns: tuple[str, ...]) -> Path:
    """The hub snapshot folder of a revision (named by its commit), downloaded where needed."""
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(spec.location, revision=spec.revision, allow_patterns=list(patterns))
    )


def identity(spec: CheckpointSpec, allow_pickle: bool = False) -> dict:
    """What a checkpoint's content is known by before it is copied: the sha256 of every wanted
    local file, the ETag (else size and mtime) of every wanted remote object, or the hub commit
    of a pinned spec."""
    if spec.kind == "local":
        return {
            p.name: file_sha256(p)
            for p in sorted(Path(spec.location).iterdir())
            if p.is_file() and wanted(p.name, allow_pickle)
        }
    if spec.kind == "remote":
        fs, root = filesystem(spec.location)
        fs.invalidate_cache(root)  # a long-lived worker must see the prefix as it is now
        return {
            i["name"].rsplit("/", 1)[-1]: str(i.get("ETag") or (i["size"], i.get("mtime")))
            for i in fs.ls(root, detail=True)
            if i["type"] == "file" and wanted(i["name"].rsplit("/", 1)[-1], allow_pickle)
        }
    return {"repo": spec.location, "commit": spec.revision}


def materialize(spec: CheckpointSpec, dest: Path, allow_pickle: bool = False) -> dict:
    """Copy the checkpoint's weights, config and tokenizer files into ``dest``.

    Returns provenance: for the hub, the commit the files came from (give a pinned spec).
    """
    if spec.kind == "hub":
        folder = _snapshot(spec, _patterns(allow_pickle))
        _copy_local(folder, dest, allow_pickle)
        return {"commit": folder.name}
    if spec.kind == "local":
        _copy_local(Path(spec.location), dest, allow_pickle)
        return {}
    fs, root = filesystem(spec.location)
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    if not names:
        raise ValueError(f"checkpoint {spec.location!r} is empty or does not exist")
    for name in names:
        if wanted(name, allow_pickle):
            fs.get_file(f"{root}/{name}", str(dest / name))
    return {}


def _copy_local(folder: Path, dest: Path, allow_pickle: bool) -> None:
    for path in sorted(folder.iterdir()):
        if path.is_file() and wanted(path.name, allow_pickle):
            shutil.copyfile(path, dest / path.name)


def check_folder(folder: Path, allow_pickle: bool = False, trust_remote_code: bool = False) -> None:
    """Refuse a checkpoint folder that is incomplete or unsafe, naming the file at fault."""
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"checkpoint {folder}: config.json is missing")
    try:
        settings = json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"checkpoint {folder}: config.json is not valid JSON ({exc})") from exc
    if "auto_map" in settings and not trust_remote_code:
        raise ValueError(
            f"checkpoint {folder}: config.json needs trust_remote_code (auto_map "
            f"{sorted(settings['auto_map'])}); refused unless explicitly allowed"
        )
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
        if not pickles:
            raise ValueError(f"checkpoint {folder}: no *.safetensors weights")
        if not allow_pickle:
            raise ValueError(
                f"checkpoint {folder}: only pickle weights ({', '.join(pickles)}), which can run "
                "code when loaded; refused unless explicitly allowed"
            )
        log.warning("loading pickle weights from %s: allowed explicitly", folder)
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ValueError(f"checkpoint {folder}: no tokenizer (tokenizer.json or tokenizer.model)")


def load(folder: Path, device=None, allow_pickle: bool = False, trust_remote_code: bool = False):
    """The model (eval mode, on ``device``) and tokenizer saved in ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    check_folder(folder, allow_pickle, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        folder, use_safetensors=not allow_pickle or None, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def save(model, tokenizer, folder: Path) -> None:
    """Save weights as safetensors, with config and tokenizer."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
