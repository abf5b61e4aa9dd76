"""Do the weights cover the model config.json describes? The model is built on the meta device,
bounded by the weights, and its parameters matched with the tensors as transformers matches
them on load."""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .problems import _short, _some
from .weights import Tensors


class _TooLarge(Exception):
    """The model config.json describes grew past what the weights could fill (the message says
    which bound it passed)."""


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
    sizes = [math.prod(shape) for _, shape in tensors.values()]
    try:
        with torch.device("meta"), _bounded_build(*_build_bounds(sizes)):
            model = AutoModelForCausalLM.from_config(config)
    except _TooLarge as exc:
        return [
            f"config.json describes {exc}, more than the weights ({len(tensors)} tensors of "
            f"{sum(sizes)} elements) could fill; not built"
        ]
    except Exception as exc:  # whatever fails here fails on config.json's content
        return [f"config.json does not describe a causal LM transformers can build ({_short(exc)})"]
    try:
        targets = _targets(model, list(tensors))
    except Exception as exc:  # a name transformers' own renaming cannot handle
        return [f"the tensor names cannot be matched as transformers matches them ({_short(exc)})"]
    return _match_problems(model, tensors, targets)


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


def _build_bounds(sizes: list[int]) -> tuple[int, int]:
    """How many parameters and modules, and how many parameter elements, building the model
    described by weights of tensors of ``sizes`` elements may register: many registrations per
    tensor (a module holds a few tensors, and some hold none); the weights' elements, plus twice
    the largest tensor's (an output layer tied to the embeddings is built untied, then
    registered again when tied) and a little more (parameters a model may leave out of its
    file). Both hold whatever the tensors are named, and the second however many there are:
    a file listing many empty tensors bounds the model to its elements, none."""
    return 16 * len(sizes) + 4096, sum(sizes) + 2 * max(sizes) + 4096


@contextmanager
def _bounded_build(registrations: int, elements: int) -> Iterator[None]:
    """Abort a model build in this thread (_TooLarge) once it has registered more than
    ``registrations`` parameters and submodules, or parameters of more than ``elements``
    elements in all (counted free on the meta device, where each module costs memory and time
    though its parameters take none); other threads' models are left alone."""
    from torch.nn.modules.module import (
        register_module_module_registration_hook,
        register_module_parameter_registration_hook,
    )

    me, built = threading.get_ident(), {"registrations": 0, "elements": 0}

    def count(added: int) -> None:
        if threading.get_ident() != me:
            return
        built["registrations"] += 1
        built["elements"] += added
        if built["registrations"] > registrations:
            raise _TooLarge(f"a model of more than {registrations} parameters and modules")
        if built["elements"] > elements:
            raise _TooLarge(f"a model of more than {elements} parameter elements")

    handles = [
        register_module_parameter_registration_hook(
            lambda module, name, value: count(0 if value is None else value.numel())
        ),
        register_module_module_registration_hook(lambda module, name, value: count(0)),
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
