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

from .store import digest, file_sha256, filesystem

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
Tensors = dict[str, tuple[str, list[int]]]  # a tensor's name: the file holding it, its shape


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


def wanted(name: str, allow_pickle: bool, trust_remote_code: bool = False) -> bool:
    """Whether a checkpoint file is copied: weights (pickle only if allowed), metadata, and the
    checkpoint's own model code (*.py) only where remote code is allowed."""
    return any(Path(name).match(p) for p in _patterns(allow_pickle, trust_remote_code))


def _patterns(allow_pickle: bool, trust_remote_code: bool = False) -> tuple[str, ...]:
    code = ("*.py",) if trust_remote_code else ()
    return WEIGHTS + METADATA + (PICKLE_WEIGHTS if allow_pickle else ()) + code


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


def materialize(
    spec: CheckpointSpec, dest: Path, allow_pickle: bool = False, trust_remote_code: bool = False
) -> dict:
    """Copy the checkpoint's weights, config and tokenizer files into ``dest``.

    Returns provenance: for the hub, the commit the files came from (give a pinned spec).
    """
    if spec.kind == "hub":
        folder = _snapshot(spec, _patterns(allow_pickle, trust_remote_code))
        _copy_local(folder, dest, allow_pickle, trust_remote_code)
        return {"commit": folder.name}
    if spec.kind == "local":
        _copy_local(Path(spec.location), dest, allow_pickle, trust_remote_code)
        return {}
    fs, root = filesystem(spec.location)
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    if not names:
        raise ValueError(f"checkpoint {spec.location!r} is empty or does not exist")
    for name in names:
        if wanted(name, allow_pickle, trust_remote_code):
            fs.get_file(f"{root}/{name}", str(dest / name))
    return {}


def _copy_local(folder: Path, dest: Path, allow_pickle: bool, trust_remote_code: bool) -> None:
    for path in sorted(folder.iterdir()):
        if path.is_file() and wanted(path.name, allow_pickle, trust_remote_code):
            shutil.copyfile(path, dest / path.name)


def check_folder(folder: Path, allow_pickle: bool = False, trust_remote_code: bool = False) -> None:
    """Refuse a checkpoint folder that is incomplete, damaged or unsafe, before any model loads:
    one ValueError that names every file at fault.

    config.json must parse and need no model code (``auto_map``) unless trust_remote_code;
    weights must be safetensors (pickle only with allow_pickle, and a warning), each header must
    parse and each shard of an index exist; the tensors' names and shapes must fit the model
    config.json describes (built on the meta device: no memory, no weights read), so that no
    weight is silently left random; a tokenizer must be there.
    """
    settings, problems = _config(folder)
    remote = "auto_map" in settings
    if remote and not trust_remote_code:
        problems.append(
            f"config.json needs trust_remote_code (auto_map {sorted(settings['auto_map'])}); "
            "refused unless explicitly allowed (--trust-remote-code)"
        )
    elif remote:
        log.warning("checkpoint %s: runs its own model code: allowed explicitly", folder)
    tensors, weight_problems = _weights(folder, allow_pickle)
    problems += weight_problems
    buildable = settings and not remote and "quantization_config" not in settings  # plain shapes
    if tensors and buildable and not weight_problems:
        problems += _shape_problems(folder, tensors)
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        problems.append("no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    if len(problems) == 1:
        raise ValueError(f"checkpoint {folder}: {problems[0]}")
    if problems:
        raise ValueError(f"checkpoint {folder}:" + "".join(f"\n    - {p}" for p in problems))


def _config(folder: Path) -> tuple[dict, list[str]]:
    """config.json as a dict ({} if unusable), and what is wrong with it."""
    path = folder / "config.json"
    if not path.is_file():
        return {}, ["config.json is missing"]
    try:
        settings = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        return {}, [f"config.json is not valid JSON ({exc})"]
    if not isinstance(settings, dict):
        return {}, ["config.json is not a JSON object"]
    return settings, []


def _weights(folder: Path, allow_pickle: bool) -> tuple[Tensors, list[str]]:
    """Every safetensors tensor's file and shape, read from the headers only, and the problems:
    no weights, pickle weights not allowed, a header that does not parse (a corrupt or truncated
    file), an index naming a shard that is not there."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = ", ".join(sorted(p.name for p in folder.glob("pytorch_model*.bin")))
        if not pickles:
            return {}, ["no *.safetensors weights"]
        if not allow_pickle:
            return {}, [
                f"only pickle weights ({pickles}), which can run code when loaded; refused "
                "unless explicitly allowed (--allow-pickle)"
            ]
        log.warning(
            "checkpoint %s: pickle weights (%s), unsafe, allowed explicitly", folder, pickles
        )
        return {}, []
    tensors, problems = {}, []
    for path in files:
        try:
            with safe_open(path, "pt") as f:
                names = f.keys()
                tensors |= {name: (path.name, f.get_slice(name).get_shape()) for name in names}
        except (SafetensorError, OSError) as exc:
            problems.append(f"{path.name} is not a readable safetensors file ({exc})")
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            problems.append(f"{index.name} is not a valid index ({exc!r})")
            continue
        if missing := sorted(s for s in shards if not (folder / s).is_file()):
            problems.append(f"{index.name} names shards that are missing: {', '.join(missing)}")
    return tensors, problems


def _shape_problems(folder: Path, tensors: Tensors) -> list[str]:
    """Where the weights and the model config.json describes disagree: tensors whose shapes
    differ, and parameters that no file holds.

    Names match as transformers matches them (also without the base model's prefix). Missing
    parameters are certain only when every tensor found its parameter: transformers renames some
    checkpoints' tensors on load (older layouts, fused experts), and those are not guessed at.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    except Exception as exc:  # whatever fails here fails on config.json's content
        return [f"config.json does not describe a causal LM transformers can build ({exc})"]
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    prefix = model.base_model_prefix
    found, strays = {}, []
    for name, (file, shape) in tensors.items():
        target = name if name in shapes else f"{prefix}.{name}"
        if target in shapes:
            found[target] = (file, list(shape))
        else:
            strays.append(name)
    problems = []
    if differ := [
        f"{file}: {name} has shape {shape}, config.json gives {shapes[name]}"
        for name, (file, shape) in sorted(found.items())
        if shape != shapes[name]
    ]:
        problems.append(_some(differ))
    if not found:
        files = ", ".join(sorted({file for file, _ in tensors.values()}))
        problems.append(f"no tensor in {files} is a parameter of the model config.json describes")
    elif not strays:
        tied: dict[int, list[str]] = {}  # tied parameters: one tensor in the file serves them all
        for name, param in model.named_parameters(remove_duplicate=False):
            tied.setdefault(id(param), []).append(name)
        if missing := [n[0] for n in tied.values() if not any(name in found for name in n)]:
            problems.append(
                f"config.json describes parameters no *.safetensors file holds: {_some(missing)}"
            )
    return problems


def describe(folder: Path) -> dict:
    """What another checkpoint must share with this one for the audit to compare them, read
    from its files without loading a model: the architecture (config.json's model_type and
    architectures), each parameter's shape (safetensors headers; None for pickle weights), the
    tokenizer vocabulary (its size and a hash of the token-to-id mapping; None where only a
    sentencepiece model holds it) and a hash of the chat template (None: there is none)."""
    settings, _ = _config(folder)
    tensors, _ = _weights(folder, allow_pickle=False)
    architecture = "+".join(settings.get("architectures") or []) or "unnamed"
    return {
        "architecture": f"{architecture} ({settings.get('model_type')})",
        "parameters": {name: shape for name, (_, shape) in tensors.items()} or None,
        "vocabulary": _vocabulary(folder),
        "chat_template": _chat_template(folder),
    }


def _vocabulary(folder: Path) -> dict | None:
    """The tokenizer's token-to-id mapping as its size and hash: tokenizer.json's model vocabulary
    and added tokens, else vocab.json and added_tokens.json (a fast and a slow tokenizer of one
    vocabulary agree); None without either."""
    if (folder / "tokenizer.json").is_file():
        spec = _json(folder / "tokenizer.json")
        try:
            vocab = spec["model"]["vocab"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{folder / 'tokenizer.json'} has no model vocabulary") from exc
        if isinstance(vocab, list):  # Unigram: [piece, score] in id order
            vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
        mapping = vocab | {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    elif (folder / "vocab.json").is_file():
        added = folder / "added_tokens.json"
        mapping = _json(folder / "vocab.json") | (_json(added) if added.is_file() else {})
    else:
        return None
    return {"tokens": len(mapping), "sha256": digest(mapping)}


def _chat_template(folder: Path) -> str | None:
    """A hash of the chat template (chat_template.jinja, else tokenizer_config.json's), or None."""
    if (folder / "chat_template.jinja").is_file():
        return digest((folder / "chat_template.jinja").read_text())
    config = folder / "tokenizer_config.json"
    template = _json(config).get("chat_template") if config.is_file() else None
    return None if template is None else digest(template)


def _json(path: Path):
    """A JSON file's content; a ValueError naming the file if it does not parse."""
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc


def compatibility_problems(named: dict[str, Path]) -> list[str]:
    """What keeps the audit from comparing each checkpoint with the original (``named`` maps
    role to folder and holds "original"): one line per checkpoint naming every mismatch in
    architecture, parameter names and shapes, tokenizer vocabulary and chat template.

    Metrics compare the original and unlearned weights parameter by parameter, and the control
    is relearned beside the candidate and compared fact by fact, so none may differ in anything
    (a property that one of the two does not record, e.g. pickle weights, is not compared).
    """
    others = {role: folder for role, folder in named.items() if role != "original"}
    if not others:
        return []
    reference = describe(named["original"])
    problems = []
    for role, folder in others.items():
        if mismatches := _mismatches(role, describe(folder), reference):
            problems.append(f"{role} vs original: " + "; ".join(mismatches))
    return problems


def _mismatches(role: str, this: dict, original: dict) -> list[str]:
    """Every way the description of the checkpoint in ``role`` differs from the original's."""
    out = []
    if this["architecture"] != original["architecture"]:
        out.append(f"architecture {this['architecture']} != {original['architecture']}")
    if this["parameters"] is not None and original["parameters"] is not None:
        out += _parameter_mismatches(role, this["parameters"], original["parameters"])
    mine, theirs = this["vocabulary"], original["vocabulary"]
    if mine is not None and theirs is not None and mine != theirs:
        n, m = mine["tokens"], theirs["tokens"]
        sizes = f"{n} vs {m} tokens" if n != m else f"{n} tokens each, not the same ones"
        out.append(f"tokenizer vocabularies differ ({sizes})")
    if this["chat_template"] != original["chat_template"]:
        none = [
            name for name, d in ((role, this), ("original", original)) if not d["chat_template"]
        ]
        out.append("chat templates differ" + (f" ({none[0]} has none)" if none else ""))
    return out


def _parameter_mismatches(
    role: str, this: dict[str, list[int]], original: dict[str, list[int]]
) -> list[str]:
    """Parameters only one of the two checkpoints holds, and those whose shapes differ."""
    out = []
    for names, where in (
        (sorted(this.keys() - original.keys()), role),
        (sorted(original.keys() - this.keys()), "original"),
    ):
        if names:
            out.append(f"{len(names)} parameter(s) only in {where}, e.g. {names[0]}")
    if differ := sorted(n for n in this.keys() & original.keys() if this[n] != original[n]):
        name = differ[0]
        out.append(
            f"{len(differ)} parameter(s) differ in shape, e.g. {name} {this[name]} != "
            f"{original[name]}"
        )
    return out


def _some(items: list[str], shown: int = 3) -> str:
    """The first few items, and how many more there are."""
    more = f" (and {len(items) - shown} more)" if len(items) > shown else ""
    return "; ".join(items[:shown]) + more


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
