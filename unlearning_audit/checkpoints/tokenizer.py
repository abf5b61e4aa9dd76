"""Whether a checkpoint's tokenizer loads as the audit needs it, from the folder's own files."""

from __future__ import annotations

from .. import scratch
from .problems import _keys, _short
from .tree import METADATA, _plain_name, _Tree

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _tokenizer_problems(tree: _Tree, trust_remote_code: bool, load: bool = True) -> list[str]:
    """What keeps the folder's tokenizer from loading as the audit needs it: none there,
    tokenizer_config.json asking for remote code (unless trust_remote_code) or naming a file
    outside the folder (a path in a ``*_file`` setting), a tokenizer.json
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
        else:
            problems += _file_setting_problems(settings)
            if "auto_map" in settings and not trust_remote_code:
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

    with scratch.folder("tokenizer") as tmp:
        try:
            for name in tree.names(*METADATA, *(("*.py",) if trust_remote_code else ())):
                tree.copy(name, tmp)
            tokenizer = AutoTokenizer.from_pretrained(tmp, trust_remote_code=trust_remote_code)
        except Exception as exc:  # whatever fails here fails on the tokenizer files' content
            return [f"the tokenizer does not load ({_short(exc).replace(str(tmp), '.')})"]
    if not getattr(tokenizer, "is_fast", False):
        return [
            f"the tokenizer loads as {type(tokenizer).__name__}, not a fast tokenizer; the audit "
            "needs one (it splits prompt and answer at character offsets): give tokenizer.json"
        ]
    return []


def _file_setting_problems(settings: dict) -> list[str]:
    """tokenizer_config.json's file settings (tokenizer_file, vocab_file, merges_file, any
    ``*_file``) that are neither null nor a file name directly in the folder: transformers 4
    opens such a path as it is given, outside the folder."""
    return [
        f"tokenizer_config.json: {key} must be null or a file name in the folder, not "
        f"{value!r}; remove it or name the file the folder holds"
        for key, value in settings.items()
        if key.endswith("_file")
        and value is not None
        and not (isinstance(value, str) and _plain_name(value))
    ]
