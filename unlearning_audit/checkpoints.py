"""Checkpoints: where they come from, how they are checked, loaded and saved.

A checkpoint spec is one of:

* ``embedded``: the built-in tiny model (built by the fetch stage, see embedded.py);
* a local folder holding a Hugging Face causal LM;
* ``s3://bucket/prefix`` (or any fsspec URL) holding the same files;
* a hub id pinned to a revision, ``org/name@revision`` (resolved to its commit; works offline
  from the local Hugging Face cache with HF_HUB_OFFLINE=1).

A fetched checkpoint is known by its content: ``identity`` names what it is before it is copied
(file hashes, S3 ETags, or the hub commit) and ``materialize`` copies exactly that: a file that
changed in between is refused.

Untrusted by default: weights load from safetensors only, and a config or tokenizer that needs
``trust_remote_code`` is refused; both can be allowed explicitly. A checkpoint folder is an
untrusted tree: every reader here (identity, materialize, check_folder, describe) reads only
regular files directly inside it, never through a link (a hub snapshot's links into its own
repo's blobs excepted), never a FIFO or device, and small files only up to METADATA_LIMIT.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Literal

from .store import digest, file_kind, filesystem

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
# The most a metadata file (config, tokenizer, index, model code) may hold: it is read whole.
# A real tokenizer.json holds 10 to 35 MB (a 256k vocabulary); an index some 100 kB.
METADATA_LIMIT = 64 * 2**20
_LIMITED = (*METADATA, "*.index.json", "*.py")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+@[\w./-]+$")
_CHUNK = 1 << 22
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
    return _matches(name, _patterns(allow_pickle, trust_remote_code))


def _patterns(allow_pickle: bool, trust_remote_code: bool = False) -> tuple[str, ...]:
    code = ("*.py",) if trust_remote_code else ()
    return WEIGHTS + METADATA + (PICKLE_WEIGHTS if allow_pickle else ()) + code


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(Path(name).match(p) for p in patterns)


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


def _hub_repo(snapshot: Path) -> Path | None:
    """The repo cache folder a hub snapshot's links may point into
    (``models--org--name/snapshots/<commit>``), or None where ``snapshot`` is not laid out as
    one (its links are then refused)."""
    repo = snapshot.parent.parent
    laid_out = snapshot.parent.name == "snapshots" and repo.name.startswith("models--")
    return repo if laid_out else None


# -- reading an untrusted folder -------------------------------------------------------------


class _Tree:
    """A checkpoint folder read as untrusted: only the regular files directly inside it.

    A link is refused, whatever it points to, except in a hub snapshot (``repo``: the repo's
    cache folder, the parent of snapshots/), whose files are links to its blobs: there a link is
    followed to a regular file inside ``repo`` only. Anything else that is not a regular file
    (FIFO, socket, device, a folder named like a checkpoint file) is refused without being
    opened, and so is a metadata file over METADATA_LIMIT. A file is opened without following
    links and without blocking, and the open descriptor must be the regular file that was
    checked: a file swapped for a link or a FIFO after the listing is refused too.

    Hard links cannot be told apart from the file they link to: one to a file outside the folder
    reads as a regular file here. Making one needs write access to that file's file system (and,
    with Linux's protected_hardlinks, to the file itself); hub caches and deduplicating copies
    make harmless ones, so they are not refused.
    """

    def __init__(self, path: Path, repo: Path | None = None) -> None:
        self.path = Path(path)
        self.repo = repo
        self.files: set[str] = set()  # regular files (in a hub snapshot: links to one), readable
        self.refused: dict[str, str] = {}  # name: why it is not read
        try:
            with os.scandir(self.path) as entries:
                names = sorted(entry.name for entry in entries)
        except OSError as exc:
            raise ValueError(
                f"checkpoint {path}: the folder cannot be read ({exc.strerror})"
            ) from exc
        for name in names:
            try:
                if self._target(name) is not None:
                    self.files.add(name)
            except ValueError as exc:
                self.refused[name] = str(exc)

    def names(self, *patterns: str) -> list[str]:
        """The readable files matching any of ``patterns``, sorted."""
        return sorted(n for n in self.files if _matches(n, patterns))

    def refusals(self, *patterns: str) -> list[str]:
        """Why the entries matching any of ``patterns`` are refused (all of them without)."""
        return [p for n, p in self.refused.items() if not patterns or _matches(n, patterns)]

    def _target(self, name: str) -> tuple[Path, os.stat_result] | None:
        """The path to open for ``name`` and its status, following a hub link; None for a folder
        with a name no checkpoint file has; a ValueError naming the entry if it is refused."""
        path, shown = self.path / name, _shown(name)
        try:
            status = os.lstat(path)
            if stat.S_ISLNK(status.st_mode):
                target = _shown(os.readlink(path))
                if self.repo is None:
                    raise ValueError(
                        f"{shown} is a symbolic link (to {target}); a checkpoint folder must hold "
                        "its files, not links to them"
                    )
                real = Path(os.path.realpath(path))
                if not real.is_relative_to(os.path.realpath(self.repo)):
                    raise ValueError(
                        f"{shown} is a link out of its hub repo's cache folder (to "
                        f"{_shown(str(real))})"
                    )
                path, status = real, os.lstat(real)
        except OSError as exc:
            raise ValueError(f"{shown} cannot be read ({exc.strerror})") from exc
        if stat.S_ISDIR(status.st_mode) and not _matches(name, _patterns(True, True)):
            return None
        if not stat.S_ISREG(status.st_mode):
            raise ValueError(f"{shown} is {file_kind(status.st_mode)}, not a regular file")
        _check_size(name, status.st_size)
        return path, status

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        """``name`` opened for reading (see the class docstring); a ValueError naming it if it
        is refused."""
        if name in self.refused:
            raise ValueError(self.refused[name])
        target = self._target(name)
        if target is None:
            raise ValueError(f"{name} is a folder, not a regular file")
        path, status = target
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
        except OSError as exc:
            raise ValueError(f"{_shown(name)} cannot be opened ({exc.strerror})") from exc
        with os.fdopen(fd, "rb") as f:
            now = os.fstat(fd)
            if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (
                status.st_dev,
                status.st_ino,
            ):
                raise ValueError(f"{_shown(name)} was replaced while it was being opened")
            _check_size(name, now.st_size)
            yield f

    def read(self, name: str) -> bytes:
        """A metadata file's bytes (at most METADATA_LIMIT, also if it grows meanwhile)."""
        with self.open(name) as f:
            data = f.read(METADATA_LIMIT + 1)
        _check_size(name, len(data), True)
        return data

    def json(self, name: str) -> Any:
        """A JSON file's content; a ValueError naming the file if it does not parse."""
        data = self.read(name)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{name} is not valid JSON ({exc})") from exc
        except RecursionError as exc:
            raise ValueError(f"{name} is not valid JSON (nested too deeply)") from exc

    def copy(self, name: str, dest: Path) -> str:
        """Copy ``name`` into ``dest`` from the descriptor it was checked on; the copy's sha256."""
        h = hashlib.sha256()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        with self.open(name) as src, os.fdopen(os.open(dest / name, flags, 0o644), "wb") as out:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
        return h.hexdigest()

    def sha256(self, name: str) -> str:
        h = hashlib.sha256()
        with self.open(name) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()


def _shown(name: str) -> str:
    """A file name as a message shows it: quoted and escaped where it holds anything unprintable
    (a name is the folder owner's to choose, and could hold terminal escapes)."""
    return name if name.isprintable() else ascii(name)


def _printable(text: str) -> str:
    """``text`` with anything unprintable escaped: messages quote names and values from the
    checkpoint's files (tensor names, shard names, config values)."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _check_size(name: str, size: int, read: bool = False) -> None:
    """Refuse a metadata file (config, tokenizer, index, model code) over METADATA_LIMIT."""
    if size > METADATA_LIMIT and _matches(name, _LIMITED):
        held = f"more than {METADATA_LIMIT / 2**20:.1f}" if read else f"{size / 2**20:.1f}"
        raise ValueError(
            f"{_shown(name)} is {held} MiB, over the {METADATA_LIMIT // 2**20} MiB limit for "
            "checkpoint metadata"
        )


def _fd_path(f: IO[bytes]) -> str:
    """A path that opens the very file ``f`` has open (for readers that take only a path)."""
    proc = f"/proc/self/fd/{f.fileno()}"
    return proc if os.path.exists(proc) else f"/dev/fd/{f.fileno()}"


def _refuse(folder: Path | str, problems: list[str]) -> None:
    """One ValueError naming the folder and every problem (none: nothing raised)."""
    problems = [_printable(p) for p in problems]
    if len(problems) == 1:
        raise ValueError(f"checkpoint {folder}: {problems[0]}")
    if problems:
        raise ValueError(f"checkpoint {folder}:" + "".join(f"\n    - {p}" for p in problems))


def _local_root(spec: CheckpointSpec) -> Path | None:
    """The folder of a local spec, or of a file:// URL (read as a local folder, links refused)."""
    if spec.kind == "local":
        return Path(spec.location)
    if spec.kind == "remote":
        fs, root = filesystem(spec.location)
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        if "file" in protocols or "local" in protocols:
            return Path(root)
    return None


# -- identity and copy -----------------------------------------------------------------------


def identity(spec: CheckpointSpec, allow_pickle: bool = False) -> dict:
    """What a checkpoint's content is known by before it is copied: the sha256 of every file
    that may be copied (model code included) of a local folder (or file:// URL), the ETag (else
    size and mtime) of every such remote object, or the hub commit of a pinned spec.

    ``materialize`` checks that what it copies is still this."""
    root = _local_root(spec)
    if root is not None:
        tree = _Tree(root)
        _refuse(root, tree.refusals(*_patterns(allow_pickle, True)))
        found = {name: tree.sha256(name) for name in tree.names(*_patterns(allow_pickle, True))}
    elif spec.kind == "remote":
        fs, path = filesystem(spec.location)
        fs.invalidate_cache(path)  # a long-lived worker must see the prefix as it is now
        found = {
            name: str(i.get("ETag") or (i["size"], i.get("mtime")))
            for name, i in _listing(fs, path).items()
            if wanted(name, allow_pickle, True)
        }
    else:
        return {"repo": spec.location, "commit": spec.revision}
    return found


def _listing(fs, path: str) -> dict[str, dict]:
    """The files directly under a remote prefix, by name."""
    return {
        i["name"].rsplit("/", 1)[-1]: i for i in fs.ls(path, detail=True) if i["type"] == "file"
    }


def materialize(
    spec: CheckpointSpec,
    dest: Path,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    *,
    expected: dict,
) -> dict:
    """Copy the checkpoint's weights, config and tokenizer files into ``dest``.

    What is copied must be what ``expected`` (the spec's ``identity``, which keys the copy)
    names: a file changed, added or removed since is refused. A local
    file is hashed as it is copied, from the descriptor it was checked on. Links, FIFOs and the
    like are refused (see _Tree); a hub snapshot's links are followed into its repo's cache only.

    Returns provenance: for the hub, the commit the files came from (give a pinned spec).
    """
    if spec.kind == "hub":
        folder = _snapshot(spec, _patterns(allow_pickle, trust_remote_code))
        _copy_local(folder, dest, allow_pickle, trust_remote_code, _hub_repo(folder))
        return {"commit": folder.name}
    root = _local_root(spec)
    if root is not None:
        copied = _copy_local(root, dest, allow_pickle, trust_remote_code)
        _check_unchanged(root, copied, expected, allow_pickle, trust_remote_code, "sha256")
        return {}
    fs, path = filesystem(spec.location)
    fs.invalidate_cache(path)
    listed = _listing(fs, path)
    if not listed:
        raise ValueError(f"checkpoint {spec.location!r} is empty or does not exist")
    take = {n: i for n, i in listed.items() if wanted(n, allow_pickle, trust_remote_code)}
    seen = {n: str(i.get("ETag") or (i["size"], i.get("mtime"))) for n, i in take.items()}
    _check_unchanged(spec.location, seen, expected, allow_pickle, trust_remote_code, "ETag")
    problems = []
    for name, info in sorted(take.items()):
        try:
            _check_size(name, int(info.get("size") or 0))
        except ValueError as exc:
            problems.append(str(exc))
    _refuse(spec.location, problems)
    for name, info in sorted(take.items()):
        fs.get_file(f"{path}/{name}", str(dest / name))
        if info.get("size") is not None and (dest / name).stat().st_size != info["size"]:
            problems.append(f"{name} changed while it was copied (size)")
    _refuse(spec.location, problems)
    return {}


def _copy_local(
    folder: Path,
    dest: Path,
    allow_pickle: bool,
    trust_remote_code: bool,
    repo: Path | None = None,
) -> dict[str, str]:
    """Copy the wanted files of ``folder`` into ``dest``; each copied file's sha256."""
    tree = _Tree(folder, repo)
    patterns = _patterns(allow_pickle, trust_remote_code)
    _refuse(folder, tree.refusals(*patterns))
    return {name: tree.copy(name, dest) for name in tree.names(*patterns)}


def _check_unchanged(
    where: Path | str,
    copied: dict[str, str],
    expected: dict,
    allow_pickle: bool,
    trust_remote_code: bool,
    what: str,
) -> None:
    """Refuse a copy that is not what ``expected`` (an identity) named: a file changed, added or
    removed in between."""
    named = {n: h for n, h in expected.items() if wanted(n, allow_pickle, trust_remote_code)}
    changed = [
        f"{name} ({what} differs)"
        for name in sorted(copied.keys() & named.keys())
        if copied[name] != named[name]
    ]
    changed += [f"{name} (added)" for name in sorted(copied.keys() - named.keys())]
    changed += [f"{name} (removed)" for name in sorted(named.keys() - copied.keys())]
    if changed:
        raise ValueError(
            f"checkpoint {where}: changed between its identity and its copy: "
            f"{_printable(_some(changed))}; fetch it again once it no longer changes"
        )


# -- checks ----------------------------------------------------------------------------------


def check_folder(folder: Path, allow_pickle: bool = False, trust_remote_code: bool = False) -> None:
    """Refuse a checkpoint folder that is incomplete, damaged or unsafe, before any model loads:
    one ValueError that names every file at fault.

    The folder is an untrusted tree (see _Tree): a link, FIFO, device or oversized metadata file
    in it is refused. config.json must parse, have the shape transformers expects, name no
    quantization and need no model code (``auto_map``) unless trust_remote_code; weights must be
    safetensors (pickle only with allow_pickle, and a warning), each header must parse and each
    shard of an index exist in the folder. The weights must cover the model config.json
    describes, and hold nothing else: every parameter present (as transformers renames tensors on
    load), no stray tensor, every shape right. The model is built on the meta device (no memory,
    no weights read), and only once its size is bounded by the weights: a config.json with more
    layers than the weights hold is refused without building it. The tokenizer must load as a
    fast tokenizer, from the folder's own files, without remote code unless trust_remote_code.
    """
    _refuse(folder, _problems(Path(folder), allow_pickle, trust_remote_code))


def _problems(folder: Path, allow_pickle: bool, trust_remote_code: bool) -> list[str]:
    """Everything check_folder refuses in ``folder``, one line each."""
    tree = _Tree(folder)
    problems = tree.refusals()
    if tree.refused and _hub_repo(folder) is not None:
        problems.append(
            "the folder is a Hugging Face hub cache snapshot, whose files are links: give the "
            "checkpoint as org/name@<commit> instead"
        )
    settings, config_problems = _config(tree)
    if settings:
        config_problems += _config_shape_problems(settings)
    remote = "auto_map" in settings
    config = None
    if settings and not config_problems and not remote:
        config_class = _config_class(settings["model_type"])
        try:
            config = config_class.from_dict(settings)
        except Exception as exc:  # whatever fails here fails on config.json's content
            config_problems.append(
                f"config.json is not a valid {config_class.__name__} ({_short(exc)})"
            )
    problems += config_problems
    if remote and not trust_remote_code:
        problems.append(
            f"config.json needs trust_remote_code (auto_map {_keys(settings['auto_map'])}); "
            "refused unless explicitly allowed (--trust-remote-code)"
        )
    elif remote:
        log.warning("checkpoint %s: runs its own model code: allowed explicitly", folder)
    kernels = _hub_kernels(settings)
    if kernels and not trust_remote_code:
        problems.append(
            f"config.json asks for kernel code from the hub ({kernels}); refused unless "
            "explicitly allowed (--trust-remote-code)"
        )
    quantized = "quantization_config" in settings
    if quantized:
        quant = settings["quantization_config"]
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        problems.append(
            f"config.json has a quantization_config (quant_method {method!r}): quantized "
            "checkpoints are not supported; give the unquantized weights"
        )
    tensors, weight_problems = _weights(tree, settings, allow_pickle)
    problems += weight_problems
    # the model is built from config.json's own classes only: not from model code, nor quantized
    buildable = not (config_problems or remote or kernels or quantized or weight_problems)
    if config is not None and tensors and buildable:
        problems += _coverage_problems(config, tensors)
    problems += _tokenizer_problems(tree, trust_remote_code, load=not config_problems)
    return problems


def _keys(value: Any) -> Any:
    return sorted(value) if isinstance(value, dict) else value


def _config(tree: _Tree) -> tuple[dict, list[str]]:
    """config.json as a dict ({} if unusable), and what is wrong with it (nothing more if it is
    refused as a file: the tree says why)."""
    if "config.json" in tree.refused:
        return {}, []
    if "config.json" not in tree.files:
        return {}, ["config.json is missing"]
    try:
        settings = tree.json("config.json")
    except ValueError as exc:
        return {}, [str(exc)]
    if not isinstance(settings, dict):
        return {}, [f"config.json is not a JSON object (it holds a {_json_type(settings)})"]
    return settings, []


def _json_type(value: Any) -> str:
    names = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null" if value is None else type(value).__name__)


def _config_shape_problems(settings: dict) -> list[str]:
    """Where config.json is not shaped as transformers reads it: model_type, architectures,
    auto_map, the layer count (a problem line each, never a traceback later)."""
    problems = []
    model_type = settings.get("model_type")
    if model_type is None:
        problems.append("config.json has no model_type (which architecture the model is)")
    elif not isinstance(model_type, str):
        problems.append(f"config.json: model_type must be a string, not {model_type!r}")
    elif "auto_map" not in settings and _config_class(model_type) is None:
        problems.append(f"config.json: model_type {model_type!r} is not one transformers knows")
    architectures = settings.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    ):
        problems.append(
            f"config.json: architectures must be a list of class names, not {architectures!r}"
        )
    if "auto_map" in settings and not isinstance(settings["auto_map"], dict):
        problems.append(f"config.json: auto_map must be an object, not {settings['auto_map']!r}")
    try:
        _declared_layers(settings)
    except ValueError as exc:
        problems.append(str(exc))
    return problems


def _config_class(model_type: str):
    """transformers' config class for a model_type, or None."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]
    except KeyError:
        return None


def _hub_kernels(settings: dict) -> str:
    """config.json's requests for kernel code from the hub (attention or experts
    implementations named by a hub repo, "org/name"); "" if none."""
    asked = []
    for scope, where in ((settings, ""), (settings.get("text_config"), "text_config.")):
        if not isinstance(scope, dict):
            continue
        for key, value in scope.items():
            values = value.values() if isinstance(value, dict) else [value]
            if key.lstrip("_").endswith("_implementation") and any(
                isinstance(v, str) and "/" in v for v in values
            ):
                asked.append(f"{where}{key} {value!r}")
    return ", ".join(asked)


def _declared_layers(settings: dict) -> tuple[str, int] | None:
    """The key and value of the decoder block count config.json states (in text_config for a
    multimodal config), None if it states none; a ValueError naming config.json if the value
    is not a whole number of at least 0."""
    model_type = settings.get("model_type")
    config_class = _config_class(model_type) if isinstance(model_type, str) else None
    own = getattr(config_class, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
    for scope, where in ((settings, ""), (settings.get("text_config"), "text_config.")):
        if not isinstance(scope, dict):
            continue
        # its own name for it and the standard one (which transformers maps to it) must agree;
        # else the first of the usual names that it states
        named = [k for k in dict.fromkeys((own, "num_hidden_layers")) if k in scope]
        named = named or [k for k in _LAYER_KEYS if k in scope][:1]
        for key in named:
            if type(scope[key]) is not int or scope[key] < 0:
                raise ValueError(
                    f"config.json: {where}{key} must be a whole number of at least 0, "
                    f"not {scope[key]!r}"
                )
        if len({scope[key] for key in named}) > 1:
            raise ValueError(
                "config.json states the number of layers twice, differently: "
                + ", ".join(f"{where}{key} {scope[key]}" for key in named)
            )
        if named:
            return f"{where}{named[0]}", scope[named[0]]
    return None


def num_blocks(folder: Path) -> int | None:
    """The number of decoder blocks the checkpoint's config.json declares (num_hidden_layers, or
    what its config class names it: n_layer, num_layers, ...; in text_config for a multimodal
    config); None if it states none or there is no config.json, or no such folder (check_folder
    refuses those; a remote checkpoint is checked once fetched).
    A ValueError naming the folder and config.json if config.json is refused or malformed."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    tree = _Tree(folder)
    if "config.json" in tree.refused:
        _refuse(folder, [tree.refused["config.json"]])
    if "config.json" not in tree.files:
        return None
    settings, problems = _config(tree)
    _refuse(folder, problems)
    try:
        declared = _declared_layers(settings)
    except ValueError as exc:
        _refuse(folder, [str(exc)])
    return None if declared is None else declared[1]


def _weights(tree: _Tree, settings: dict, allow_pickle: bool) -> tuple[Tensors, list[str]]:
    """Every tensor of the safetensors files transformers loads (config.json's
    transformers_weights if named, else model.safetensors, else the shards of
    model.safetensors.index.json) with its file and shape, read from the headers only, and the
    problems: no weights, pickle weights not allowed, a header that does not parse (a corrupt
    or truncated file), an index naming a shard that is not a safetensors file in the folder.
    Other *.safetensors files are not loaded by transformers: they are ignored, with a warning."""
    from safetensors import SafetensorError, safe_open

    problems = []
    indices = tree.names("*.safetensors.index.json")
    shards: dict[str, list[str]] = {}
    for index in indices:
        try:
            content = tree.json(index)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        try:
            shards[index] = sorted(set(content["weight_map"].values()))
            if not all(isinstance(s, str) for s in shards[index]):
                raise TypeError("a shard name is not a string")
        except (KeyError, TypeError, AttributeError) as exc:
            problems.append(f"{index} is not a valid index ({exc!r})")
            continue
        if outside := [s for s in shards[index] if not _plain_name(s)]:
            problems.append(f"{index} names shards outside the folder: {_some(outside)}")
        elif other := [s for s in shards[index] if not s.endswith(".safetensors")]:
            problems.append(f"{index} names shards that are not safetensors files: {_some(other)}")
        elif missing := [s for s in shards[index] if s not in tree.files | tree.refused.keys()]:
            problems.append(f"{index} names shards that are missing: {', '.join(missing)}")
    present = tree.files | tree.refused.keys()
    explicit = settings.get("transformers_weights")
    if explicit is not None:
        if not (
            isinstance(explicit, str)
            and _plain_name(explicit)
            and explicit.endswith((".safetensors", ".safetensors.index.json"))
        ):
            return {}, [
                *problems,
                "config.json: transformers_weights must name a *.safetensors file or index in "
                f"the folder, not {explicit!r}",
            ]
        if explicit not in present:
            return {}, [*problems, f"config.json: transformers_weights {explicit} is missing"]
        source = explicit
    elif "model.safetensors" in present:
        source = "model.safetensors"
    elif "model.safetensors.index.json" in present:
        source = "model.safetensors.index.json"
    else:
        return {}, problems + _no_safetensors(tree, allow_pickle)
    if source in tree.refused:
        return {}, problems  # the tree says why
    files = shards.get(source, []) if source.endswith(".json") else [source]
    if ignored := sorted(set(tree.names("*.safetensors")) - set(files)):
        log.warning(
            "checkpoint %s: %s not loaded (transformers loads %s); ignored",
            tree.path,
            ", ".join(ignored),
            _some(files),
        )
    tensors: Tensors = {}
    for name in files:
        if name not in tree.files:
            continue  # refused (the tree says why) or missing (the index check says so)
        try:
            with tree.open(name) as f, safe_open(_fd_path(f), "pt") as st:
                keys = st.keys()
                tensors |= {key: (name, list(st.get_slice(key).get_shape())) for key in keys}
        except (SafetensorError, OSError) as exc:
            problems.append(f"{name} is not a readable safetensors file ({exc})")
        except ValueError as exc:  # refused when opened
            problems.append(str(exc))
    return tensors, problems


def _no_safetensors(tree: _Tree, allow_pickle: bool) -> list[str]:
    """The problems of a folder without model.safetensors or its index: none but pickle weights
    where those are allowed (with a warning)."""
    if tree.refusals("pytorch_model*"):
        return []  # the tree says why
    pickles = ", ".join(tree.names("pytorch_model*.bin"))
    if not pickles:
        if other := tree.names("*.safetensors"):
            return [
                "no model.safetensors or model.safetensors.index.json (transformers loads only "
                f"those, not {_some(other)})"
            ]
        return [] if tree.refusals("*.safetensors") else ["no *.safetensors weights"]
    if not allow_pickle:
        return [
            f"only pickle weights ({pickles}), which can run code when loaded; refused "
            "unless explicitly allowed (--allow-pickle)"
        ]
    log.warning(
        "checkpoint %s: pickle weights (%s), unsafe, allowed explicitly", tree.path, pickles
    )
    return []


def _plain_name(name: str) -> bool:
    """A file name directly inside a folder: no separator, not "." or ".."."""
    return bool(name) and name not in (".", "..") and not re.search(r"[/\\\x00]", name)


# -- do the weights cover the model? ---------------------------------------------------------


class _TooLarge(Exception):
    """The model config.json describes grew past what the weights could fill."""


def _coverage_problems(config, tensors: Tensors) -> list[str]:
    """Where the weights and the model ``config`` (config.json's) describes disagree: a model
    larger than the weights could fill (refused before it is built), tensors whose shapes
    differ, tensors that are no parameter of the model, parameters that no file holds.

    Names are matched as transformers matches them on load: renamed by the model's own
    conversion mapping (older layouts, fused experts), with or without the base model's prefix;
    tied parameters need one tensor between them, and what the model declares ignorable on
    load (missing or unexpected) is not reported. ``load`` checks again what transformers
    reports, for renames this cannot follow.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if problem := _layer_bound(config, tensors):
        return [problem]
    limit = 16 * len(tensors) + 4096  # registrations: parameters and modules, many per tensor
    try:
        with torch.device("meta"), _registrations_at_most(limit):
            model = AutoModelForCausalLM.from_config(config)
    except _TooLarge:
        return [
            f"config.json describes a model of more than {limit} parameters and modules, far "
            f"more than the {len(tensors)} tensors of the weights could fill; not built"
        ]
    except Exception as exc:  # whatever fails here fails on config.json's content
        return [f"config.json does not describe a causal LM transformers can build ({_short(exc)})"]
    try:
        targets = _targets(model, list(tensors))
    except Exception as exc:  # a name transformers' own renaming cannot handle
        return [f"the tensor names cannot be matched as transformers matches them ({_short(exc)})"]
    return _match_problems(model, tensors, targets)


def _short(exc: Exception) -> str:
    """An exception as a problem line quotes it: its type and (the start of) its message."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:300] + "..."


def _layer_bound(config, tensors: Tensors) -> str | None:
    """A config.json with more decoder blocks than the weights hold, told before the model is
    built (a hostile layer count would take minutes and gigabytes to build on meta)."""
    try:
        layers = config.get_text_config(decoder=True).num_hidden_layers
    except (AttributeError, TypeError, ValueError):
        return None
    if type(layers) is not int:
        return None
    container, held = _blocks(tensors)
    if container is None:
        if layers <= len(tensors):
            return None
        return (
            f"config.json describes {layers} layers, more than the {len(tensors)} tensor(s) "
            "the weights hold; not built"
        )
    if layers <= len(held):
        return None
    missing = [f"{container}.{i}.*" for i in range(min(layers, len(held) + 3)) if i not in held]
    count = layers - sum(1 for i in held if i < layers)
    return (
        f"config.json describes {layers} layers, the weights hold {len(held)}; config.json "
        f"describes parameters no *.safetensors file holds: {_some(missing, total=count)}"
    )


def _blocks(tensors: Tensors) -> tuple[str | None, set[int]]:
    """The weights' list of decoder blocks: the numbered container (the first numbered part of
    a tensor's name, e.g. model.layers.N) holding the most indices, and its indices."""
    found: dict[str, set[int]] = {}
    for name in tensors:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part.isascii() and part.isdigit():
                if i and len(part) < 10:
                    found.setdefault(".".join(parts[:i]), set()).add(int(part))
                break
    if not found:
        return None, set()
    container = max(sorted(found), key=lambda c: len(found[c]))
    return container, found[container]


@contextmanager
def _registrations_at_most(limit: int) -> Iterator[None]:
    """Abort a model build in this thread (_TooLarge) once it has registered more than ``limit``
    parameters and submodules; other threads' models are left alone."""
    from torch.nn.modules.module import (
        register_module_module_registration_hook,
        register_module_parameter_registration_hook,
    )

    me, count = threading.get_ident(), [0]

    def hook(module, name, value):
        if threading.get_ident() == me:
            count[0] += 1
            if count[0] > limit:
                raise _TooLarge(limit)

    handles = [
        register_module_parameter_registration_hook(hook),
        register_module_module_registration_hook(hook),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _targets(model, names: list[str]) -> dict[str, tuple[list[str], bool]]:
    """Where transformers puts each checkpoint tensor on load: the state-dict keys it fills (one
    for a renamed tensor, several for one a converter splits) and whether it is converted (its
    shape may then differ by design); no keys for a tensor that is no parameter of the model.

    Follows transformers' own loader (core_model_loading.convert_and_load_state_dict_in_model)
    with the model's own conversion mapping; where those are not there (another transformers
    version), names match as they are or with the base model's prefix added or removed."""
    state = model.state_dict()
    prefix = model.base_model_prefix
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:
        out = {}
        for name in names:
            bare = name.removeprefix(f"{prefix}.")
            hit = [n for n in (name, f"{prefix}.{name}", bare) if n in state][:1]
            out[name] = (hit, False)
        return out
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    out = {}
    for name in sorted(names, key=dot_natural_key):
        renamed, pattern = rename_source_key(name, renamings, converters, prefix, state)
        if renamed not in state and name in state:
            renamed, pattern = rename_source_key(name, [], [], prefix, state)
        if renamed not in state:
            out[name] = ([], False)
        elif pattern is None:
            out[name] = ([renamed], False)
        else:
            first = by_pattern[pattern].target_patterns[0]
            keys = [renamed.replace(first, t) for t in by_pattern[pattern].target_patterns]
            out[name] = ([k for k in keys if k in state], True)
    return out


def _match_problems(model, tensors: Tensors, targets: dict) -> list[str]:
    """Shapes that differ, tensors that are no parameter, parameters that no tensor fills."""
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    ignore_unexpected = _regex(
        set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        | ({r"rotary_emb\.inv_freq"} if _has_buffer(model, "rotary_emb.inv_freq") else set())
        | ({r"(^|\.)position_ids$"} if _has_buffer(model, "position_ids") else set())
    )
    ignore_missing = _regex(set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ()))
    found: set[str] = set()
    differ, strays = [], []
    for name, (file, shape) in sorted(tensors.items()):
        keys, converted = targets[name]
        found.update(keys)
        if not keys and not (ignore_unexpected and ignore_unexpected.search(name)):
            strays.append((file, name))
        elif keys and not converted and shape != shapes[keys[0]]:
            differ.append(f"{file}: {name} has shape {shape}, config.json gives {shapes[keys[0]]}")
    problems = []
    if differ:
        problems.append(_some(differ))
    if not found:
        files = ", ".join(sorted({file for file, _ in tensors.values()}))
        return [f"no tensor in {files} is a parameter of the model config.json describes"]
    for file in sorted({file for file, _ in strays}):
        names = [name for f, name in strays if f == file]
        problems.append(
            f"{file} holds tensors that are no parameter of the model config.json describes: "
            f"{_some(names)}"
        )
    groups: dict[int, list[str]] = {}  # tied parameters: one tensor in the file serves them all
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing = []
    for names in groups.values():
        ties = set(names) | {tied[n] for n in names if n in tied}
        ties |= {t for t, s in tied.items() if s in names}
        if not ties & found and not (
            ignore_missing and all(ignore_missing.search(n) for n in names)
        ):
            missing.append(names[0])
    if missing:
        problems.append(
            f"config.json describes parameters no *.safetensors file holds: {_some(missing)}"
        )
    return problems


def _regex(patterns: set[str]) -> re.Pattern | None:
    return re.compile("|".join(f"({p})" for p in sorted(patterns))) if patterns else None


def _has_buffer(model, suffix: str) -> bool:
    return any(name.endswith(suffix) for name, _ in model.named_buffers())


# -- the tokenizer ---------------------------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _tokenizer_problems(tree: _Tree, trust_remote_code: bool, load: bool = True) -> list[str]:
    """What keeps the folder's tokenizer from loading as the audit needs it: none there,
    tokenizer_config.json asking for remote code (unless trust_remote_code), a tokenizer.json
    that is no tokenizer, or a tokenizer that does not load, or loads as a slow one (prompts
    split prompt and answer at character offsets, which only fast tokenizers give).

    It is loaded (``load``: config.json is sound, and transformers may read it to choose the
    tokenizer's class) from a private copy of the folder's metadata files, read as _Tree reads
    them: exactly what the fetch stage would copy, never through a link."""
    if not tree.names(*_TOKENIZER_FILES):
        if tree.refusals(*_TOKENIZER_FILES):
            return []
        return ["no tokenizer (tokenizer.json, tokenizer.model or vocab.json)"]
    problems = []
    if "tokenizer_config.json" in tree.files:
        try:
            settings = tree.json("tokenizer_config.json")
        except ValueError as exc:
            settings, problems = {}, [str(exc)]
        if not isinstance(settings, dict):
            problems.append("tokenizer_config.json is not a JSON object")
        elif "auto_map" in settings and not trust_remote_code:
            problems.append(
                "tokenizer_config.json needs trust_remote_code (auto_map "
                f"{_keys(settings['auto_map'])}); refused unless explicitly allowed "
                "(--trust-remote-code)"
            )
    if "tokenizer.json" in tree.files:
        try:
            spec = tree.json("tokenizer.json")
            if not isinstance(spec, dict):
                problems.append("tokenizer.json is not a JSON object")
            elif not isinstance(spec.get("model"), dict):
                problems.append("tokenizer.json has no model (its vocabulary and algorithm)")
        except ValueError as exc:
            problems.append(str(exc))
    if problems or tree.refusals(*METADATA) or not load:
        return problems
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="ua-tokenizer-") as tmp:
        try:
            for name in tree.names(*METADATA, *(("*.py",) if trust_remote_code else ())):
                tree.copy(name, Path(tmp))
            tokenizer = AutoTokenizer.from_pretrained(tmp, trust_remote_code=trust_remote_code)
        except Exception as exc:  # whatever fails here fails on the tokenizer files' content
            return [f"the tokenizer does not load ({_short(exc).replace(tmp, '.')})"]
    if not getattr(tokenizer, "is_fast", False):
        return [
            f"the tokenizer loads as {type(tokenizer).__name__}, not a fast tokenizer; the audit "
            "needs one (it splits prompt and answer at character offsets): give tokenizer.json"
        ]
    return []


# -- what checkpoints must share -------------------------------------------------------------


def describe(folder: Path) -> dict:
    """What another checkpoint must share with this one for the audit to compare them, read
    from its files without loading a model: the architecture (config.json's model_type and
    architectures), each parameter's shape (safetensors headers of the files transformers loads;
    None for pickle weights), the tokenizer vocabulary (its size and a hash of the token-to-id
    mapping; None where only a sentencepiece model holds it) and a hash of the chat template
    (None: there is none). Read as check_folder reads it: a refused file is a ValueError."""
    tree = _Tree(Path(folder))
    settings, _ = _config(tree)
    tensors, _ = _weights(tree, settings, allow_pickle=False)
    architectures = settings.get("architectures")
    if isinstance(architectures, list):
        architecture = "+".join(str(a) for a in architectures) or "unnamed"
    else:
        architecture = "unnamed" if architectures is None else str(architectures)
    return {
        "architecture": f"{architecture} ({settings.get('model_type')})",
        "parameters": {name: shape for name, (_, shape) in tensors.items()} or None,
        "vocabulary": _vocabulary(tree),
        "chat_template": _chat_template(tree),
    }


def _vocabulary(tree: _Tree) -> dict | None:
    """The tokenizer's token-to-id mapping as its size and hash: tokenizer.json's model vocabulary
    and added tokens, else vocab.json and added_tokens.json (a fast and a slow tokenizer of one
    vocabulary agree); None without either."""
    if "tokenizer.json" in tree.files | tree.refused.keys():
        spec = _json(tree, "tokenizer.json")
        try:
            vocab = spec["model"]["vocab"]
            if isinstance(vocab, list):  # Unigram: [piece, score] in id order
                vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
            mapping = vocab | {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{tree.path / 'tokenizer.json'} has no model vocabulary") from exc
    elif "vocab.json" in tree.files | tree.refused.keys():
        mapping = _json(tree, "vocab.json")
        if "added_tokens.json" in tree.files | tree.refused.keys():
            mapping = mapping | _json(tree, "added_tokens.json")
    else:
        return None
    return {"tokens": len(mapping), "sha256": digest(mapping)}


def _chat_template(tree: _Tree) -> str | None:
    """A hash of the chat template (chat_template.jinja, else tokenizer_config.json's), or None."""
    if "chat_template.jinja" in tree.files | tree.refused.keys():
        try:
            return digest(tree.read("chat_template.jinja").decode())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{tree.path}: {exc}") from exc
    if "tokenizer_config.json" not in tree.files | tree.refused.keys():
        return None
    config = _json(tree, "tokenizer_config.json")
    template = config.get("chat_template") if isinstance(config, dict) else None
    return None if template is None else digest(template)


def _json(tree: _Tree, name: str):
    """A JSON file's content; a ValueError naming the file (with its folder) if it is refused
    or does not parse."""
    try:
        return tree.json(name)
    except ValueError as exc:
        raise ValueError(f"{tree.path}: {exc}") from exc


# -- compatibility ---------------------------------------------------------------------------


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
            problems.append(_printable(f"{role} vs original: " + "; ".join(mismatches)))
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


def _some(items: list[str], shown: int = 3, total: int | None = None) -> str:
    """The first few items, and how many more there are (of ``total``, if more than listed)."""
    total = len(items) if total is None else total
    more = f" (and {total - shown} more)" if total > shown else ""
    return "; ".join(items[:shown]) + more


# -- loading and saving ----------------------------------------------------------------------


def load(folder: Path, device=None, allow_pickle: bool = False, trust_remote_code: bool = False):
    """The model (eval mode, on ``device``) and tokenizer saved in ``folder``, once check_folder
    passes; a ValueError naming the parameters if transformers still reports some missing from
    the weights (ones it would fill with random values: a rename check_folder cannot follow,
    model code, or pickle weights, whose names it does not read).

    The weights load in the checkpoint's own dtype (``dtype="auto"``: config.json's, else the
    weights'), asked for explicitly: transformers 4 loads in float32 by default, doubling a
    bf16 model's memory. Training stages change the dtype for training (training.fit)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    check_folder(folder, allow_pickle, trust_remote_code)
    model, info = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype="auto",
        use_safetensors=not allow_pickle or None,
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
    )
    _refuse(folder, _loading_problems(model, info))
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def _loading_problems(model, info: dict) -> list[str]:
    """Parameters transformers left unloaded (its missing keys, after ties and the keys the
    model declares ignorable); buffers are the model's own to compute, not reported."""
    missing = []
    for key in sorted(info.get("missing_keys") or ()):
        try:
            model.get_parameter(key)
        except AttributeError:
            continue
        missing.append(key)
    problems = []
    if missing:
        problems.append(
            "the weights leave parameters of the model config.json describes unset (transformers "
            f"would fill them with random values): {_some(missing)}"
        )
    if mismatched := sorted(str(k[0]) for k in info.get("mismatched_keys") or ()):
        problems.append(f"tensors of the wrong shape: {_some(mismatched)}")
    if unexpected := sorted(info.get("unexpected_keys") or ()):
        log.warning("checkpoint tensors transformers did not load: %s", _some(unexpected))
    return problems


def save(model, tokenizer, folder: Path) -> None:
    """Save weights as safetensors, with config and tokenizer."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
