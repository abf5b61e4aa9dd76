"""Checkpoints: where they come from, how they are checked, loaded and saved.

A checkpoint spec is one of:

* ``embedded``: the built-in tiny model (built by the fetch stage, see embedded.py);
* a local folder holding a Hugging Face causal LM;
* ``s3://bucket/prefix`` (or any fsspec URL) holding the same files;
* a hub id pinned to a revision, ``org/name@revision`` (resolved to its commit; works offline
  from the local Hugging Face cache with HF_HUB_OFFLINE=1).

Untrusted by default: weights load from safetensors only, and a config that needs
``trust_remote_code`` is refused; both can be allowed explicitly.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import fsspec

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
    patterns = WEIGHTS + METADATA + (PICKLE_WEIGHTS if allow_pickle else ())
    return any(Path(name).match(p) for p in patterns)


def materialize(spec: CheckpointSpec, dest: Path, allow_pickle: bool = False) -> dict:
    """Copy the checkpoint's weights, config and tokenizer files into ``dest``.

    Returns provenance: the spec and, for the hub, the commit the revision resolved to.
    """
    if spec.kind == "hub":
        from huggingface_hub import snapshot_download

        patterns = list(WEIGHTS + METADATA + (PICKLE_WEIGHTS if allow_pickle else ()))
        folder = Path(
            snapshot_download(spec.location, revision=spec.revision, allow_patterns=patterns)
        )
        _copy_local(folder, dest, allow_pickle)
        return {"source": f"{spec.location}@{spec.revision}", "commit": folder.name}
    if spec.kind == "local":
        _copy_local(Path(spec.location), dest, allow_pickle)
    else:
        fs, root = fsspec.core.url_to_fs(spec.location)
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        if not names:
            raise ValueError(f"checkpoint {spec.location!r} is empty or does not exist")
        for name in names:
            if wanted(name, allow_pickle):
                fs.get_file(f"{root}/{name}", str(dest / name))
    return {"source": spec.location}


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
