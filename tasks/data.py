"""Data stage: the probe sets (forget, retain, unrelated, halves) as Parquet in the store."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._stage import CPU_OPTIONS, cached_stage, write_json
from unlearning_audit import corpus, data
from unlearning_audit.config import DataConfig, EmbeddedConfig
from unlearning_audit.store import code_version, file_sha256


def _source_identity(source: str | None) -> str | None:
    """A local file by content; a `datasets` source by its (pinned) name."""
    if source is None:
        return None
    path = Path(source).expanduser()
    return file_sha256(path) if path.is_file() else source


@task(name="prepare-data", cache_policy=NO_CACHE, **CPU_OPTIONS)
def prepare_data(store: str, config: DataConfig, embedded: EmbeddedConfig):
    """Build and validate the probe sets, from the embedded corpus or the user's sources."""
    external = config.external

    def build(_, out: Path) -> dict:
        if external:
            sets = data.external_sets(config)
        else:
            facts, forget = corpus.embedded(embedded)
            sets = data.embedded_sets(facts, forget, config.domain)
        data.check_sets(sets)
        data.write_sets(sets, out)
        write_json(
            out / data.FORMAT,
            config.model_dump(include={"prompt_format", "separator", "max_new_tokens"}),
        )
        return {"rows": {name: len(rows) for name, rows in sets.items()}}

    sources = {k: _source_identity(getattr(config, k)) for k in ("forget", "retain", "unrelated")}
    return cached_stage(
        store,
        "data",
        {"sources": sources},
        {"data": config, "embedded": None if external else embedded},
        code_version(corpus, data),
        build,
    )
