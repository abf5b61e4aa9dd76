"""check_folder: a checkpoint folder refused, every problem named, before any model loads; and
what its config.json declares."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .coverage import _coverage_problems
from .fetch import _hub_repo
from .problems import _keys, _refuse, _short
from .tokenizer import _tokenizer_problems
from .tree import _checkpoint_files, _Tree
from .weights import _weights, _weights_file

log = logging.getLogger(__name__)

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def check_folder(folder: Path, allow_pickle: bool = False, trust_remote_code: bool = False) -> None:
    """Refuse a checkpoint folder that is incomplete, damaged or unsafe, before any model loads:
    one ValueError that names every file at fault.

    The folder is an untrusted tree (see _Tree): a link, FIFO, device or oversized metadata file
    named like a checkpoint file is refused (other entries are never read). config.json must
    parse, have the shape transformers expects, name no quantization and need no model code
    (``auto_map``) unless trust_remote_code; weights must be safetensors (pickle only with
    allow_pickle, and a warning), each header must parse and each shard of an index exist in the
    folder. The weights must cover the model config.json
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
    problems = tree.refusals(*_checkpoint_files(allow_pickle))
    if problems and _hub_repo(folder) is not None:
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


def safetensors_weights(folder: Path) -> str | None:
    """The safetensors file or index transformers loads from a checked folder (by the rule
    check_folder applies), or None where it loads pickle weights: the fetch stage converts
    those, whatever other *.safetensors file (an adapter's) lies beside them."""
    tree = _Tree(Path(folder))
    settings, _ = _config(tree)
    return _weights_file(settings, tree.files | tree.refused.keys())
