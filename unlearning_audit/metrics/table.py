"""The metrics stage: compare two models' stored activations (and weights), layer by layer,
into one long-format table (metric, layer, probe_set, value) that the verdict and report read.

Each layer's two activation files are read once, into memory (PCA needs whole layers). CKA takes
the cheaper route for the layer's shape (n x n kernels for probe sets smaller than the width,
else the O(d^2) accumulator), and each model's activations are fitted by PCA once per layer,
every PCA view read off the two fits.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..activations import layer_path, read_layer
from .cka import cka_moments
from .depth import DepthParts
from .pca import pca_metrics

SCHEMA = pa.schema(
    [
        ("metric", pa.string()),
        ("layer", pa.int32()),
        ("probe_set", pa.string()),
        ("value", pa.float64()),
    ]
)


def cka_values(X: np.ndarray, Y: np.ndarray) -> dict[str, float]:
    """Biased and (from 4 rows) debiased linear CKA of paired activations, in one pass."""
    moments = cka_moments(X, Y)
    values = {"cka": moments.cka()}
    if moments.n >= 4:
        values["cka_debiased"] = moments.cka(debiased=True)
    return values


def layer_values(X: np.ndarray, Y: np.ndarray, k: int = 2) -> dict[str, float]:
    """One layer's CKA (biased, debiased), PCA similarity (PC1, top-k), PCA distance and shift,
    named and ordered as in the table."""
    pca = pca_metrics(X, Y, k)
    return {**cka_values(X, Y), **{f"pca_{name}": v for name, v in pca.items()}}


def activation_rows(
    x_folder: Path, y_folder: Path, probe_sets: list[str], layers: list[int], k: int = 2
) -> list[dict]:
    """:func:`layer_values` of every probe set and layer, as table rows."""
    rows = []
    for probe_set in probe_sets:
        for layer in layers:
            X = read_layer(layer_path(x_folder, probe_set, layer))
            Y = read_layer(layer_path(y_folder, probe_set, layer))
            rows += [
                {"metric": m, "layer": layer, "probe_set": probe_set, "value": float(v)}
                for m, v in layer_values(X, Y, k).items()
            ]
    return rows


def weight_rows(change: dict[int, float]) -> list[dict]:
    """Relative weight change per layer (weights.weight_change, or as a relearn run stored it)
    as table rows (probe_set is empty: it depends on no data)."""
    return [
        {"metric": "weight_change", "layer": layer, "probe_set": "", "value": value}
        for layer, value in change.items()
    ]


def fisher_rows(fisher0: dict, summary: dict, distance: dict[int, float]) -> list[dict]:
    """Per layer on the forget set: the candidate's empirical Fisher mean and quantiles
    (``summary``, its fisher_summary), the ratio of its mean to the original's (``fisher0``, its
    values), and the original-Fisher-weighted ``distance`` of the weights (fisher.
    fisher_weighted_distance, or its terms summed by layer); none where either Fisher is empty
    (its stage skipped: a ratio needs both)."""
    if not fisher0 or not summary:
        return []
    means0 = {layer: float(values.double().mean()) for layer, values in fisher0.items()}
    rows = fisher_summary_rows("fisher", means0, summary)
    return rows + [
        _row("fisher_weighted_distance", layer, "forget", distance[layer]) for layer in summary
    ]


def fisher_summary_rows(prefix: str, means0: dict[int, float], summary: dict) -> list[dict]:
    """Per layer on the forget set, from a candidate's Fisher ``summary`` and the original's
    per-layer means ``means0``: ``{prefix}_mean``, ``_q50``, ``_q90``, ``_q99``, ``_mean_ratio``
    (NaN where the original's mean is 0) and ``_mean_original``; none where either is empty."""
    if not means0 or not summary:
        return []
    rows = []
    for layer, entry in summary.items():
        if layer not in means0:
            raise ValueError(f"layer {layer} is missing from the original's Fisher")
        mean0 = means0[layer]
        kept = ("mean", "q50", "q90", "q99")
        values = {f"{prefix}_{k}": v for k, v in entry.items() if k in kept}
        values[f"{prefix}_mean_ratio"] = entry["mean"] / mean0 if mean0 else math.nan
        values[f"{prefix}_mean_original"] = mean0
        rows += [_row(m, layer, "forget", v) for m, v in values.items()]
    return rows


def depth_rows(weight: DepthParts, fisher: DepthParts | None) -> list[dict]:
    """The depth shares (metrics.depth) as table rows, ``layer`` holding k (the last k blocks
    plus the head): ``depth_share_weight`` (tied head/embedding matrix counted as head) and
    ``depth_share_weight_untied`` (it left out), probe_set empty, and the tied matrix's share
    ``tied_share_weight`` at layer 0; the same of the Fisher-weighted distance on the forget
    set (``depth_share_fisher`` ...) where ``fisher`` is given."""
    rows = []
    for what, parts, probe_set in (("weight", weight, ""), ("fisher", fisher, "forget")):
        if parts is None:
            continue
        for metric, curve in (
            (f"depth_share_{what}", parts.share()),
            (f"depth_share_{what}_untied", parts.share(tied_as_head=False)),
        ):
            rows += [_row(metric, k, probe_set, value) for k, value in enumerate(curve)]
        rows.append(_row(f"tied_share_{what}", 0, probe_set, parts.tied_share))
    return rows


def _row(metric: str, layer: int, probe_set: str, value: float) -> dict:
    return {"metric": metric, "layer": layer, "probe_set": probe_set, "value": float(value)}


def write(rows: list[dict], path: Path) -> None:
    """Write the long-format table as Parquet."""
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)


def read(path_or_file) -> list[dict]:
    """Read a long-format metrics table."""
    return pq.read_table(path_or_file).to_pylist()


def mean_over_layers(
    rows: list[dict], metric: str, probe_set: str, skip_layer0: bool = True
) -> float:
    """Mean of a metric over layers for one probe set (the embeddings layer skipped by default)."""
    values = [
        r["value"]
        for r in rows
        if r["metric"] == metric
        and r["probe_set"] == probe_set
        and not (skip_layer0 and r["layer"] == 0)
    ]
    return sum(values) / len(values) if values else float("nan")
