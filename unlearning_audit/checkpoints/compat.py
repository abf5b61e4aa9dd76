"""What checkpoints must share for the audit to compare them: each described from its files
without loading a model, and every mismatch with the original named."""

from __future__ import annotations

from pathlib import Path

from ..store import digest
from .checks import _config, _json_type
from .problems import _printable
from .tree import _Tree
from .weights import _weights


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
        mapping = _json_object(tree, "vocab.json")
        if "added_tokens.json" in tree.files | tree.refused.keys():
            mapping = mapping | _json_object(tree, "added_tokens.json")
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


def _json_object(tree: _Tree, name: str) -> dict:
    """A JSON file's object (a token-to-id mapping); a ValueError naming the file (with its
    folder) if it is refused, does not parse, or holds anything else."""
    value = _json(tree, name)
    if not isinstance(value, dict):
        raise ValueError(
            f"{tree.path}: {name} is not a JSON object (it holds a {_json_type(value)})"
        )
    return value


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
