"""Fisher stage (GPU): the diagonal empirical Fisher of a checkpoint on the forget set."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import load_file, save_file

from tasks._stage import cached_stage, gpu_options, load_inputs
from unlearning_audit import data, prompts, runtime
from unlearning_audit.metrics import fisher as fisher_mod
from unlearning_audit.store import ArtifactRef, Store, code_version

FISHER = "fisher.safetensors"


def read_fisher(store: Store, ref: ArtifactRef) -> dict[int, object]:
    """The stored per-layer Fisher tensors, keyed by layer index; none where the stage skipped
    (the metrics stage then adds no Fisher rows)."""
    tensors = load_file(store.local_dir(ref) / FISHER)
    return {int(name.removeprefix("layer.")): value for name, value in tensors.items()}


@task(name="fisher", cache_policy=NO_CACHE, **gpu_options())
def fisher(
    store: str,
    checkpoint: ArtifactRef,
    data_ref: ArtifactRef,
    probe_set: str = "forget",
    max_rows: int = 200,
    batch_size: int = 16,
    device: str = "auto",
    trust_remote_code: bool = False,
):
    """Per-sample-gradient diagonal Fisher of every layer, on one probe set.

    ``batch_size`` only trades memory for speed; the values do not depend on it. A model that
    gives no per-sample gradients (fisher.UnsupportedModel) is skipped, not failed: the artifact
    then holds no tensors, its reason in the file's metadata and the manifest (``skipped``).
    The checkpoint's own model code runs only with ``trust_remote_code`` (the audit's
    parameter; nothing in the store can grant it).
    """

    def build(s, out):
        model, fmt, sets, _ = load_inputs(
            s, checkpoint, data_ref, runtime.setup(0, device), trust_remote_code=trust_remote_code
        )
        rows = data.sample(sets[probe_set], max_rows)
        meta = {"probe_set": probe_set, "rows": len(rows), "dtype": str(model.dtype)}
        dev = next(model.parameters()).device
        batches = (
            {k: v.to(dev) for k, v in data.train_batch(fmt, chunk).items()}
            for chunk in data.chunks(rows, batch_size)
        )
        try:
            values = fisher_mod.fisher_diagonal(model, batches)
        except fisher_mod.UnsupportedModel as err:
            save_file({}, out / FISHER, metadata={"skipped": str(err)})
            return {**meta, "skipped": str(err)}
        save_file({f"layer.{layer}": v.contiguous() for layer, v in values.items()}, out / FISHER)
        return meta

    return cached_stage(
        store,
        "fisher",
        {"checkpoint": checkpoint, "data": data_ref},
        {"probe_set": probe_set, "max_rows": max_rows},
        code_version(fisher_mod, data, prompts),
        build,
    )
