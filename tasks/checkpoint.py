"""Fetch stage: a checkpoint into the store, checked, with a record of exactly what was seen;
then the fetched checkpoints checked against each other.

The embedded default (and its never-learned control) is built here from the corpus. Any other
checkpoint is keyed by its content identity (file hashes, ETags or the hub commit); its manifest
records the spec asked for and, for the hub, the commit; its content hash is the manifest hash.
"""

from __future__ import annotations

from pathlib import Path

from tasks._progress import StageProgress
from tasks._stage import cached_stage, stage_task, write_json
from unlearning_audit import checkpoints, corpus, data, embedded, evaluation, runtime, training
from unlearning_audit.config import EmbeddedConfig
from unlearning_audit.store import ArtifactRef, Store, code_version


def _build_embedded(out: Path, config: EmbeddedConfig, control: bool, variant: int) -> dict:
    name = "pretrain the never-learned control" if control else "pretrain the embedded model"
    with StageProgress(name) as progress:
        model, tokenizer, log = embedded.build(config, control, variant, progress)
    checkpoints.save(model, tokenizer, out)
    write_json(out / "pretrain.json", log)
    return {"source": "embedded-control" if control else "embedded", "steps": log["steps"]}


@stage_task("fetch-checkpoint", "gpu")
def fetch_checkpoint(
    store: str,
    spec: str,
    config: EmbeddedConfig,
    control: bool = False,
    variant: int = 0,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
):
    """The checkpoint as a store artifact: built (embedded) or copied, then checked.

    For the embedded model, ``control`` builds its never-learned control and ``variant`` > 0
    another pretraining of it (another initialisation and data order)."""
    parsed = checkpoints.parse(spec)
    if parsed.kind == "embedded":
        return cached_stage(
            store,
            "checkpoint",
            {"control": control, **({"variant": variant} if variant else {})},
            config,
            code_version(embedded, corpus, training, data, evaluation, runtime),
            lambda s, out: _build_embedded(out, config, control, variant),
        )

    pinned = checkpoints.pin(parsed)
    content = checkpoints.identity(pinned, allow_pickle)

    def build(_, out: Path) -> dict:
        provenance = checkpoints.materialize(
            pinned, out, allow_pickle, trust_remote_code, expected=content
        )
        checkpoints.check_folder(out, allow_pickle, trust_remote_code)
        if allow_pickle and checkpoints.safetensors_weights(out) is None:
            model, tokenizer = checkpoints.load(
                out, allow_pickle=True, trust_remote_code=trust_remote_code
            )
            for p in out.glob("pytorch_model*"):
                p.unlink()
            checkpoints.save(model, tokenizer, out)
        # a record of what was allowed when fetched, for people: no stage reads it (a
        # manifest's meta is covered by no hash; later stages get the flag as a parameter)
        return {"source": spec, "trust_remote_code": trust_remote_code, **provenance}

    return cached_stage(
        store,
        "checkpoint",
        {"content": content},
        {"trust_remote_code": trust_remote_code},
        code_version(checkpoints),
        build,
    )


@stage_task("check-compatible", "cpu")
def check_compatible(store: str, refs: dict[str, ArtifactRef | None]) -> None:
    """Refuse the audit, before any model stage, when a fetched checkpoint cannot be compared
    with the original (refs maps role to checkpoint; None: that role has none): one ValueError
    naming every mismatch (see checkpoints.compatibility_problems). Preflight compares local
    folders already; remote and hub checkpoints are only comparable once fetched. With the
    original alone there is nothing to compare, and nothing is read."""
    present = {role: ref for role, ref in refs.items() if ref is not None}
    if len(present) < 2:
        return
    s = Store(store)
    folders = {role: s.local_dir(ref) for role, ref in present.items()}
    if problems := checkpoints.compatibility_problems(folders):
        raise ValueError("incompatible checkpoints:\n  - " + "\n  - ".join(problems))
