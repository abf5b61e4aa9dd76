"""The weights transformers loads from a checkpoint folder, and what their headers hold."""

from __future__ import annotations

import logging

from .problems import _some
from .tree import PICKLE_WEIGHTS, _fd_path, _matches, _plain_name, _Tree

log = logging.getLogger(__name__)

Tensors = dict[str, tuple[str, list[int]]]  # a tensor's name: the file holding it, its shape


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
    if explicit is not None and not (
        isinstance(explicit, str)
        and _plain_name(explicit)
        and explicit.endswith((".safetensors", ".safetensors.index.json"))
    ):
        return {}, [
            *problems,
            "config.json: transformers_weights must name a *.safetensors file or index in "
            f"the folder, not {explicit!r}",
        ]
    source = _weights_file(settings, present)
    if source is None:
        return {}, problems + _no_safetensors(tree, allow_pickle)
    if source not in present:
        return {}, [*problems, f"config.json: transformers_weights {source} is missing"]
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


def _weights_file(settings: dict, present: set[str]) -> str | None:
    """The safetensors file or index transformers loads, given config.json's ``settings`` and
    the names ``present`` in the folder: transformers_weights where config.json names it (there
    or not), else model.safetensors, else model.safetensors.index.json; None if none of these
    (pickle weights, or none: other *.safetensors files are not loaded)."""
    explicit = settings.get("transformers_weights")
    if isinstance(explicit, str):
        return explicit
    names = ("model.safetensors", "model.safetensors.index.json")
    return next((name for name in names if name in present), None)


def _no_safetensors(tree: _Tree, allow_pickle: bool) -> list[str]:
    """The problems of a folder without model.safetensors or its index: none but pickle weights
    where those are allowed (with a warning)."""
    present = sorted(tree.files | tree.refused.keys())
    pickles = ", ".join(n for n in present if _matches(n, ("pytorch_model*.bin",)))
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
    if tree.refusals(*PICKLE_WEIGHTS):
        return []  # the tree says why
    log.warning(
        "checkpoint %s: pickle weights (%s), unsafe, allowed explicitly", tree.path, pickles
    )
    return []
