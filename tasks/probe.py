"""Probe stage (CPU): linear probes per layer on stored activations, for several models."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from tasks._stage import cached_stage, load_sets, stage_task
from tasks.extract import SUMMARY, probe_rows
from unlearning_audit import activations, probes, runtime
from unlearning_audit.store import ArtifactRef, code_version

PROBES = "probes.parquet"
SCHEMA = pa.schema([("layer", pa.int64()), ("metric", pa.string()), ("value", pa.float64())])


def skipped(table: pa.Table) -> str | None:
    """Why the probe stage skipped, from its stored table's metadata; None when it probed."""
    reason = (table.schema.metadata or {}).get(b"skipped")
    return reason.decode() if reason is not None else None


@stage_task("probe", "cpu")
def probe(
    store: str,
    data_ref: ArtifactRef,
    checkpoint: ArtifactRef,
    acts: ArtifactRef,
    max_rows: int = 200,
    seed: int = 0,
):
    """Probe accuracy per layer of the model ``checkpoint``, from its stored activations
    (``acts``), whose rows are the same samples of the forget and retain sets, labelled with
    their answers' content (probes.answer_label).

    Labels that carry no signal (probes.label_problem) skip the stage, not fail it: its table
    is then empty, the reason in the table's metadata and the manifest (``skipped``).
    """

    def build(s, out):
        runtime.setup(seed, "cpu")
        rows = probe_rows(load_sets(s, data_ref), max_rows)
        problem = probes.label_problem(
            probes.probe_labels(rows["retain"]), probes.probe_labels(rows["forget"])
        )
        if problem:
            pq.write_table(SCHEMA.with_metadata({"skipped": problem}).empty_table(), out / PROBES)
            return {"rows": 0, "skipped": problem}
        folder = s.local_dir(acts)
        table = []
        for layer in s.read_json(acts, SUMMARY)["layers"]:
            X = {
                name: activations.read_layer(activations.layer_path(folder, name, layer))
                for name in ("forget", "retain")
            }
            result = probes.probe_layer(
                X["retain"], rows["retain"], X["forget"], rows["forget"], seed=seed
            )
            table += [{"layer": layer, "metric": k, "value": v} for k, v in result.items()]
        pq.write_table(pa.Table.from_pylist(table, schema=SCHEMA), out / PROBES)
        return {"rows": len(table)}

    return cached_stage(
        store,
        "probe",
        {"data": data_ref, "checkpoint": checkpoint, "acts": acts},
        {"max_rows": max_rows, "seed": seed},
        code_version(probes, activations),
        build,
    )
