"""Probe stage (CPU): linear probes per layer on stored activations, for several models."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._stage import CPU_OPTIONS, cached_stage, load_sets
from tasks.extract import SUMMARY, probe_rows
from unlearning_audit import activations, probes, runtime
from unlearning_audit.store import ArtifactRef, Store, code_version

PROBES = "probes.parquet"


def labelled(store: Store, data_ref: ArtifactRef, checkpoint: ArtifactRef, max_rows: int):
    """The forget and retain rows the activations were extracted on, each with a ``label``:
    the answer where rows name their attribute (embedded corpus), else its first token."""
    sets = load_sets(store, data_ref)
    rows = probe_rows(sets, max_rows)
    if all(r.get("attribute") for r in rows["forget"] + rows["retain"]):
        return {name: [{**r, "label": r["answer"]} for r in rs] for name, rs in rows.items()}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(store.local_dir(checkpoint))
    first = lambda a: str(tokenizer(f" {a}", add_special_tokens=False)["input_ids"][0])  # noqa: E731
    return {name: [{**r, "label": first(r["answer"])} for r in rs] for name, rs in rows.items()}


@task(name="probe", cache_policy=NO_CACHE, **CPU_OPTIONS)
def probe(
    store: str,
    data_ref: ArtifactRef,
    checkpoint: ArtifactRef,
    acts: ArtifactRef,
    max_rows: int = 200,
    seed: int = 0,
):
    """Probe accuracy per layer of one model, from its stored activations (``acts``), whose
    rows are the same samples of the forget and retain sets."""

    def build(s, out):
        runtime.setup(seed, "cpu")
        rows = labelled(s, data_ref, checkpoint, max_rows)
        folder = s.local_dir(acts)
        table = []
        for layer in s.read_json(acts, SUMMARY)["layers"]:
            X = {
                name: activations.read_layer(activations.layer_path(folder, name, layer))
                for name in ("forget", "retain")
            }
            result = probes.probe_layer(
                X["retain"], rows["retain"], X["forget"], rows["forget"], label="label", seed=seed
            )
            table += [{"layer": layer, "metric": k, "value": v} for k, v in result.items()]
        pq.write_table(pa.Table.from_pylist(table), out / PROBES)
        return {"rows": len(table)}

    return cached_stage(
        store,
        "probe",
        {"data": data_ref, "checkpoint": checkpoint, "acts": acts},
        {"max_rows": max_rows, "seed": seed},
        code_version(probes, activations),
        build,
    )
