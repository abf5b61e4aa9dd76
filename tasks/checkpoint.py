"""Fetch stage: a checkpoint into the store, checked, with a record of exactly what was seen.

The embedded default (and its never-learned control) is built here from the corpus.
"""

from __future__ import annotations

from pathlib import Path

import fsspec
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._stage import cached_stage, gpu_options, write_json
from unlearning_audit import checkpoints, corpus, data, embedded, evaluation, runtime, training
from unlearning_audit.config import EmbeddedConfig
from unlearning_audit.store import ArtifactRef, Store, code_version, file_sha256

GPU = gpu_options()


def _identity(spec: checkpoints.CheckpointSpec, allow_pickle: bool) -> dict:
    """What the checkpoint's content is known by, before it is copied."""
    if spec.kind == "local":
        folder = Path(spec.location)
        return {
            name: file_sha256(folder / name)
            for name in sorted(
                p.name
                for p in folder.iterdir()
                if p.is_file() and checkpoints.wanted(p.name, allow_pickle)
            )
        }
    if spec.kind == "remote":
        fs, root = fsspec.core.url_to_fs(spec.location)
        return {i["name"]: str(i.get("ETag") or i.get("size")) for i in fs.ls(root, detail=True)}
    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        spec.location, revision=spec.revision, allow_patterns=["config.json"]
    )
    return {"repo": spec.location, "commit": Path(folder).name}


def _build_embedded(
    store: Store, out: Path, data_ref: ArtifactRef, config: EmbeddedConfig, control: bool
) -> dict:
    runtime.setup(config.seed, "cpu")
    facts = pq.read_table(store.local_dir(data_ref) / "corpus.parquet").to_pylist()
    train = [r for r in facts if not (control and r["forget"])]
    target = [r for r in facts if r["forget"] != control]
    tokenizer = embedded.train_tokenizer(
        [corpus.Fact(**{k: r[k] for k in corpus.Fact.__dataclass_fields__}) for r in facts],
        config.vocab_size,
    )
    model = embedded.build_model(tokenizer, config)
    log = embedded.pretrain(model, tokenizer, train, data.sample(target, 400), config)
    checkpoints.save(model, tokenizer, out)
    write_json(out / "pretrain.json", log)
    return {"source": "embedded-control" if control else "embedded", "steps": log["steps"]}


@task(name="fetch-checkpoint", cache_policy=NO_CACHE, **GPU)
def fetch_checkpoint(
    store: str,
    spec: str,
    data_ref: ArtifactRef,
    config: EmbeddedConfig,
    control: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
):
    """The checkpoint as a store artifact: built (embedded) or copied, then checked."""
    parsed = checkpoints.parse(spec)
    if parsed.kind == "embedded":
        return cached_stage(
            store,
            "checkpoint",
            {"data": data_ref, "control": control},
            config,
            code_version(embedded, corpus, training, data, evaluation),
            lambda s, out: _build_embedded(s, out, data_ref, config, control),
        )

    def build(_, out: Path) -> dict:
        provenance = checkpoints.materialize(parsed, out, allow_pickle)
        checkpoints.check_folder(out, allow_pickle, trust_remote_code)
        if allow_pickle and not any(out.glob("*.safetensors")):
            model, tokenizer = checkpoints.load(
                out, allow_pickle=True, trust_remote_code=trust_remote_code
            )
            for p in out.glob("pytorch_model*"):
                p.unlink()
            checkpoints.save(model, tokenizer, out)
        return provenance

    return cached_stage(
        store,
        "checkpoint",
        {"content": _identity(parsed, allow_pickle)},
        {"trust_remote_code": trust_remote_code},
        code_version(checkpoints),
        build,
    )
