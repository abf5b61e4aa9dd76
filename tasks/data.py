"""Data stage: the probe sets (forget, retain, unrelated, halves) as Parquet in the store."""

from __future__ import annotations

from pathlib import Path

from tasks._stage import cached_stage, stage_task, write_json
from unlearning_audit import corpus, data
from unlearning_audit.config import DataConfig, EmbeddedConfig
from unlearning_audit.store import code_version

EMBEDDED_INPUTS = {"sources": {"forget": None, "retain": None, "unrelated": None}}
"""The embedded corpus's inputs: none beyond its config (EmbeddedConfig) and the code."""


def data_inputs(config: DataConfig) -> tuple[dict, dict[str, list[dict]] | None]:
    """The data stage's inputs, and the user's sets where the facts are theirs.

    External sets are loaded and validated here, before the store is asked (one ValueError
    names every problem), and keyed by a digest of the rows loaded (data.identity): any source
    (a file, a folder, a `datasets` name, pinned or not) is identified by its content, so edited
    data is new data, never served stale from the store.
    """
    if not config.external:
        return EMBEDDED_INPUTS, None
    sets = data.external_sets(config)
    data.check_sets(sets)
    return {"rows": data.identity(sets)}, sets


@stage_task("prepare-data", "cpu")
def prepare_data(store: str, config: DataConfig, embedded: EmbeddedConfig):
    """Build and validate the probe sets, from the embedded corpus or the user's sources."""
    external = config.external
    inputs, loaded = data_inputs(config)

    def build(_, out: Path) -> dict:
        sets = loaded
        if sets is None:
            facts, forget = corpus.embedded(embedded)
            sets = data.embedded_sets(facts, forget, config.domain)
            data.check_sets(sets)
        data.write_sets(sets, out)
        write_json(
            out / data.FORMAT,
            config.model_dump(include={"prompt_format", "separator", "max_new_tokens"}),
        )
        return {"rows": {name: len(rows) for name, rows in sets.items()}}

    return cached_stage(
        store,
        "data",
        inputs,
        {"data": config, "embedded": None if external else embedded},
        code_version(corpus, data),
        build,
    )
