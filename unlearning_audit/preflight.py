"""Checks run before any stage: every problem with an audit's inputs, reported at once,
before a model is loaded or a GPU is touched."""

from __future__ import annotations

from pathlib import Path

from . import checkpoints, data
from .config import AuditParams
from .store import Store, default_store_url


def preflight(params: AuditParams) -> str:
    """Validate checkpoints (a local folder's files too: see checkpoints.check_folder), data
    sources and the store; return the store URL.

    Raises one ValueError listing every problem found.
    """
    problems = []
    specs = {"original": params.original, "unlearned": params.unlearned, "control": params.control}
    for role, spec in specs.items():
        if spec is None:
            continue
        try:
            parsed = checkpoints.parse(spec)
            if parsed.kind == "local":  # others are checked the same way once fetched
                checkpoints.check_folder(
                    Path(parsed.location), params.allow_pickle, params.trust_remote_code
                )
        except ValueError as exc:
            problems.append(f"{role}: {exc}")
    sources = {
        "forget": params.data.forget,
        "retain": params.data.retain,
        "unrelated": params.data.unrelated,
    }
    if (sources["forget"] is None) != (sources["retain"] is None):
        problems.append("data: give both a forget and a retain source, or neither")
    if sources["forget"] is None and params.original != checkpoints.EMBEDDED:
        problems.append(
            "data: a checkpoint other than the embedded one needs forget and retain "
            "sources (data.forget, data.retain)"
        )
    for role, source in sources.items():
        local = source and Path(source).suffix in {".json", ".jsonl", ".parquet"}
        if local and not Path(source).expanduser().is_file():
            problems.append(f"data.{role}: file {source!r} does not exist")
    if not problems and sources["forget"] is not None:
        try:
            data.check_sets(data.external_sets(params.data))
        except ValueError as exc:
            problems.append(f"data: {exc}")
    if not params.methods and params.unlearned is None:
        problems.append("methods: give at least one unlearning method, or an unlearned checkpoint")
    url = params.store or default_store_url()
    try:
        Store(url).check_writable()
    except ValueError as exc:
        problems.append(f"store: {exc}")
    if problems:
        raise ValueError("invalid audit:\n  - " + "\n  - ".join(problems))
    return url
