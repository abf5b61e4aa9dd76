"""Layer activations to Parquet, and back to numpy without per-row Python work.

One forward pass per batch captures every selected layer through forward hooks: layer 0 is the
token embeddings, layer i the residual stream after decoder block i - 1 (layers.py). Inputs are
the prompts only (never the answer, which a probe would otherwise read off). Pooling is a mean
over real tokens (padding excluded), or ``per_token`` keeps one row per real token; each hook
pools its layer's output at once, so the pass holds only what is stored.

Each (probe set, layer) is one Parquet file, ``<set>/layer=<i>.parquet``, written batch by
batch: an ``activation`` fixed-size-list float column (float32 or float16, zstd, byte-stream-split,
no dictionary), and ``row`` (plus ``token`` per token) to pair rows across models.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .data import chunks, prompt_batch
from .layers import check_layers, decoder_blocks
from .prompts import Renderer

COLUMN = "activation"


def activation_schema(dim: int, dtype: str, per_token: bool) -> pa.Schema:
    """Every field required (not nullable): Parquet then writes no definition levels for them,
    which makes the list column faster to encode."""
    value = pa.float16() if dtype == "float16" else pa.float32()
    fields = [pa.field("row", pa.int64(), nullable=False)]
    if per_token:
        fields.append(pa.field("token", pa.int32(), nullable=False))
    element = pa.field("element", value, nullable=False)
    fields.append(pa.field(COLUMN, pa.list_(element, dim), nullable=False))
    return pa.schema(fields)


def layer_path(folder: Path, probe_set: str, layer: int) -> Path:
    """Where the activations of one probe set and layer live inside an artifact folder."""
    return folder / probe_set / f"layer={layer}.parquet"


class _Capture:
    """Forward hooks on the embeddings and on chosen decoder blocks that pool each output as it
    is made (:func:`_pool`), so a forward pass never holds every layer's full (batch, tokens, d)
    states: set ``mask`` to the batch's attention mask before the pass."""

    def __init__(self, model, layers: list[int], per_token: bool):
        _, blocks = decoder_blocks(model)
        self.per_token = per_token
        self.mask: torch.Tensor | None = None
        self.outputs: dict[int, torch.Tensor] = {}
        modules = {0: model.get_input_embeddings()} | {i + 1: b for i, b in enumerate(blocks)}
        self.handles = [modules[layer].register_forward_hook(self._hook(layer)) for layer in layers]

    def _hook(self, layer: int):
        def keep(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.outputs[layer] = _pool(hidden, self.mask, self.per_token)

        return keep

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _pool(hidden: torch.Tensor, mask: torch.Tensor, per_token: bool) -> torch.Tensor:
    """One layer's (b, t, d) states as stored, in float32: the mean over real tokens (b, d), pads
    excluded, or with ``per_token`` the real tokens' rows in order (tokens, d). On the mask's
    device: a model split over GPUs (checkpoints.load) runs its blocks on several."""
    hidden = hidden.to(mask.device, torch.float32)
    if per_token:
        return hidden[mask.bool()]
    m = mask[:, :, None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class LayerWriters:
    """One Parquet writer per layer of a probe set, fed from background threads.

    Batches are buffered up to ``flush_rows`` rows (large row groups); a flush writes every
    layer's file on its own thread (Parquet encoding releases the GIL; up to one thread per
    usable core, or ``threads``) while the next forward passes run. One flush is in flight at
    a time, so memory holds at most the buffer being filled, the one being written, and the
    latter's per-layer concatenation. On a GPU the writer, not the forward pass, is what can
    fall behind; bench/bench_extract.py times it alone.
    """

    def __init__(
        self,
        folder: Path,
        name: str,
        layers: list[int],
        schema: pa.Schema,
        flush_rows: int,
        threads: int | None = None,
    ):
        self.schema, self.flush_rows = schema, flush_rows
        self.writers = {}
        for layer in layers:
            path = layer_path(folder, name, layer)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writers[layer] = pq.ParquetWriter(
                path,
                schema,
                compression="zstd",
                use_dictionary=False,
                use_byte_stream_split=[f"{COLUMN}.list.element"],
            )
        self.buffer: list[tuple[list[pa.Array], dict[int, np.ndarray]]] = []
        self.rows = 0
        self.pool = ThreadPoolExecutor(max_workers=threads or max(1, min(len(layers), _cores())))
        self.pending: list[Future] = []

    def add(self, keys: list[pa.Array], values: dict[int, np.ndarray]) -> None:
        """Queue one batch: its key columns and each layer's (rows, d) values."""
        self.buffer.append((keys, values))
        self.rows += len(keys[0])
        if self.rows >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        buffer, self.buffer, self.rows = self.buffer, [], 0
        self._wait()
        keys = [pa.concat_arrays([b[0][i] for b in buffer]) for i in range(len(buffer[0][0]))]
        self.pending = [
            self.pool.submit(self._write, layer, keys, [b[1][layer] for b in buffer])
            for layer in self.writers
        ]

    def _write(self, layer: int, keys: list[pa.Array], parts: list[np.ndarray]) -> None:
        values = np.concatenate(parts)
        column = pa.FixedSizeListArray.from_arrays(
            pa.array(values.reshape(-1)), type=self.schema.field(COLUMN).type
        )
        self.writers[layer].write_table(pa.Table.from_arrays([*keys, column], schema=self.schema))

    def _wait(self) -> None:
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()  # re-raises a failed write here

    def close(self) -> None:
        """Write what is buffered and close every file, also when a write failed; the failure
        is raised (a later error while closing keeps it as its context)."""
        with ExitStack() as closing:
            for writer in self.writers.values():
                closing.callback(writer.close)
            closing.callback(self.pool.shutdown)
            self.flush()
            self._wait()


def _cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@torch.no_grad()
def extract(
    model,
    fmt: Renderer,
    sets: dict[str, Sequence[dict]],
    folder: Path,
    layers: Sequence[int] | None = None,
    per_token: bool = False,
    batch_size: int = 32,
    dtype: str = "float32",
    progress: Callable[[int, int], None] | None = None,
    flush_rows: int = 8192,
) -> dict:
    """Write the activations of every probe set and layer under ``folder``; returns a summary.

    ``progress(batches done, batches in all)`` is called after each forward pass.
    """
    chosen = check_layers(layers, len(decoder_blocks(model)[1]))
    dim = model.get_input_embeddings().embedding_dim
    schema = activation_schema(dim, dtype, per_token)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    device = next(model.parameters()).device
    capture = _Capture(model, chosen, per_token)
    counts = {}
    total, done = sum(math.ceil(len(rows) / batch_size) for rows in sets.values()), 0
    try:
        for name, rows in sets.items():
            writers = LayerWriters(folder, name, chosen, schema, flush_rows)
            try:
                start = 0
                for rows_chunk in chunks(rows, batch_size):
                    batch = prompt_batch(fmt, rows_chunk)
                    capture.mask = mask = batch["attention_mask"].to(device)
                    model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
                    index = np.arange(start, start + len(rows_chunk))
                    keys, values = _batch(capture.outputs, chosen, mask, index, per_token)
                    writers.add(keys, {k: v.astype(np_dtype) for k, v in values.items()})
                    start += len(rows_chunk)
                    done += 1
                    if progress is not None:
                        progress(done, total)
            finally:
                writers.close()
            counts[name] = len(rows)
    finally:
        capture.close()
    return {"layers": chosen, "dim": dim, "rows": counts, "per_token": per_token, "dtype": dtype}


def _batch(outputs, layers, mask, index, per_token) -> tuple[list[pa.Array], dict]:
    """Key columns and per-layer values of one batch from the hooks' pooled outputs, with one
    device-to-host copy for all layers."""
    values = torch.stack([outputs[layer] for layer in layers]).cpu().numpy()  # (L, rows, d)
    if per_token:
        keep = mask.bool().cpu().numpy()
        keys = [
            pa.array(np.repeat(index, keep.sum(1))),
            pa.array(np.nonzero(keep)[1].astype(np.int32)),
        ]
    else:
        keys = [pa.array(index)]
    return keys, dict(zip(layers, values, strict=True))


def to_numpy(batch: pa.RecordBatch | pa.Table) -> np.ndarray:
    """The activation column as an (n, d) float array, without per-row Python work."""
    column = batch.column(COLUMN)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).reshape(-1, dim)


def read_layer(path, filesystem=None) -> np.ndarray:
    """All activations of one Parquet file as an (n, d) array."""
    return to_numpy(pq.read_table(path, columns=[COLUMN], filesystem=filesystem))


def iter_layer(path, batch_rows: int = 8192, filesystem=None) -> Iterator[np.ndarray]:
    """Activations of one Parquet file in (<= batch_rows, d) arrays, for streaming metrics."""
    source = filesystem.open(path, "rb") if filesystem is not None else path
    for batch in pq.ParquetFile(source).iter_batches(batch_size=batch_rows, columns=[COLUMN]):
        yield to_numpy(batch)
