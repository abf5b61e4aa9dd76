"""Benchmarks of unlearning_audit.metrics, each side by side with the naive route, in one run.

    python bench/bench_metrics.py [--quick] [--device cpu|cuda] [--model-size 0.9m|100m]
                                  [--only cka|width|fisher]

Prints a Markdown table. ``ratio`` is baseline / ours for times (above 1: ours is faster) and
ours at the larger n / ours at the smaller n for memory (1: flat in n). CKA runs on the CPU
(numpy); ``--device`` moves only the Fisher comparison. BLAS and torch use ``--threads`` threads
(default 1: two threads oversubscribe a shared 2-core machine). Not part of CI.

``width``: the metrics stage's activation metrics at a 7B model's width (issue 15: 33 layers of
d = 4096, 200 rows per probe set, random float32 activations in Parquet) against the
implementation it replaced, kept here as the reference (:func:`reference_values`: feature-space
CKA and six eigendecompositions of the d x d covariance per layer). The reference costs about a
minute per layer at d = 4096, so it runs on ``--reference-layers`` layers, which give its time
per layer and the values compared; the old stage's time is that per layer times the layers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from threadpoolctl import threadpool_limits
from transformers import LlamaConfig, LlamaForCausalLM

from unlearning_audit import activations
from unlearning_audit.metrics import CKAAccumulator, fisher_diagonal, layer_parameters, table

Batch = tuple[np.ndarray, np.ndarray]
T = TypeVar("T")

MODELS = {
    "0.9m": {
        "vocab_size": 1024,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    "100m": {
        "vocab_size": 32000,
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
    },
}


@dataclass(frozen=True)
class Sizes:
    """Problem sizes: the full run follows the brief, ``--quick`` shrinks every n and d."""

    cka_n: int
    cka_d: int
    batch_rows: int
    memory_ns: tuple[int, int]
    gram_n: int
    repeats: int
    width_d: int
    width_layers: int
    layer_ds: tuple[int, ...]

    @classmethod
    def pick(cls, quick: bool) -> Sizes:
        if quick:
            return cls(8192, 256, 1024, (4096, 16384), 2000, 3, 512, 5, (256,))
        return cls(50_000, 1024, 4096, (16_384, 65_536), 20_000, 2, 4096, 33, (1024, 2048))


@dataclass(frozen=True)
class Row:
    name: str
    ours: str
    baseline: str
    ratio: float
    target: str
    note: str = ""


def paired_batches(n: int, d: int, rows: int, seed: int = 0) -> Iterator[Batch]:
    """Correlated float32 activation batches (Y a noisy linear map of X), made lazily."""
    rng = np.random.default_rng(seed)
    mixing = (rng.normal(size=(d, d)) / np.sqrt(d)).astype(np.float32)
    for start in range(0, n, rows):
        x = rng.standard_normal((min(rows, n - start), d), dtype=np.float32) + 1.0
        yield x, x @ mixing + 0.5 * rng.standard_normal(x.shape, dtype=np.float32)


def best_time(run: Callable[[], object], repeats: int) -> float:
    """Shortest wall time of ``repeats`` calls (the least disturbed by a shared machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def streaming_cka(batches: Iterator[Batch] | list[Batch], d: int, debiased: bool) -> float:
    accumulator = CKAAccumulator(d, d, debiased=debiased)
    for x, y in batches:
        accumulator.update(x, y)
    return accumulator.result()


def cross_product_only(batches: list[Batch], d: int, dtype: type) -> np.ndarray:
    """The baseline: X^T Y alone over the same batches, products in ``dtype``, summed in float64."""
    total = np.zeros((d, d))
    for x, y in batches:
        total += x.astype(dtype, copy=False).T @ y.astype(dtype, copy=False)
    return total


def gram_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Kornblith et al.'s Gram route: centred n x n linear kernels, two matrices held at once,
    in the inputs' dtype; the three Frobenius products summed in float64."""

    def centred_gram(A: np.ndarray) -> np.ndarray:
        gram = A @ A.T
        row_means = gram.mean(axis=1)
        gram -= row_means[:, None]
        gram -= row_means[None, :]
        gram += row_means.mean()
        return gram

    def dot(A: np.ndarray, B: np.ndarray) -> float:
        return float(np.einsum("ij,ij->", A, B, dtype=np.float64))

    K, L = centred_gram(X), centred_gram(Y)
    return dot(K, L) / np.sqrt(dot(K, K) * dot(L, L))


def measure(run: Callable[[], T]) -> tuple[T, float, int]:
    """(result, wall seconds, peak traced bytes) of one call; numpy reports its buffers to
    tracemalloc, so the peak counts every array the call allocates."""
    tracemalloc.start()
    try:
        start = time.perf_counter()
        result = run()
        return result, time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def bench_streaming(sizes: Sizes) -> list[Row]:
    """Streaming CKA on float32 activations (float32 products, float64 state) against X^T Y
    alone: in float64, the exact route, and in the same float32 arithmetic as ours."""
    n, d, rows = sizes.cka_n, sizes.cka_d, sizes.batch_rows
    batches = list(paired_batches(n, d, rows))
    exact = {
        debiased: streaming_cka([(x.astype(np.float64), y) for x, y in batches], d, debiased)
        for debiased in (False, True)
    }
    base = {
        dtype: best_time(lambda: cross_product_only(batches, d, dtype), sizes.repeats)  # noqa: B023
        for dtype in (np.float64, np.float32)
    }
    result, ours = [], {}
    for debiased in (False, True):
        value = streaming_cka(batches, d, debiased)
        ours[debiased] = best_time(
            lambda: streaming_cka(batches, d, debiased),  # noqa: B023
            sizes.repeats,
        )
        label = "debiased" if debiased else "biased"
        error = f"rel. diff from float64 CKA {abs(value - exact[debiased]) / exact[debiased]:.0e}"
        result.append(
            Row(
                f"streaming {label} CKA, n={n:,}, d={d}, f32 batches of {rows}",
                f"{ours[debiased]:.2f} s",
                f"{base[np.float64]:.2f} s (X^T Y only, f64)",
                base[np.float64] / ours[debiased],
                ">= 0.5 (within 2x)",
                error,
            )
        )
    result.append(
        Row(
            "the same biased CKA against X^T Y in its own arithmetic (f32 products, f64 sums)",
            f"{ours[False]:.2f} s",
            f"{base[np.float32]:.2f} s (X^T Y only, f32)",
            base[np.float32] / ours[False],
            "info",
            "floor 0.5: X^T X and Y^T Y cost as much arithmetic as X^T Y",
        )
    )
    return result


def bench_memory(sizes: Sizes) -> Row:
    d, rows = sizes.cka_d, sizes.batch_rows
    small, large = (
        measure(lambda n=n: streaming_cka(paired_batches(n, d, rows), d, True))[2]
        for n in sizes.memory_ns
    )
    n_small, n_large = sizes.memory_ns
    return Row(
        f"streaming CKA peak memory, n={n_small:,} vs {n_large:,}, d={d}",
        f"{small / 2**20:.0f} MiB vs {large / 2**20:.0f} MiB",
        "-",
        large / small,
        "~1 (flat in n)",
        "tracemalloc; includes the batch being generated",
    )


def bench_gram(sizes: Sizes) -> list[Row]:
    """Streaming CKA on float32 activations against the n x n Gram route in float64 and in
    float32 (with float64 sums)."""
    n, d, rows = sizes.gram_n, sizes.cka_d, sizes.batch_rows
    X, Y = (np.concatenate(parts) for parts in zip(*paired_batches(n, d, rows), strict=True))
    views = [(X[i : i + rows], Y[i : i + rows]) for i in range(0, n, rows)]
    ours_value, ours, ours_peak = measure(lambda: streaming_cka(views, d, False))
    result = []
    for dtype in (np.float64, np.float32):
        base_value, base, base_peak = measure(
            lambda dtype=dtype: gram_cka(X.astype(dtype), Y.astype(dtype))
        )
        result.append(
            Row(
                f"streaming (f32 products) vs n x n Gram CKA in {np.dtype(dtype).name}, "
                f"n={n:,}, d={d}",
                f"{ours:.2f} s, {ours_peak / 2**20:.0f} MiB",
                f"{base:.2f} s, {base_peak / 2**20:.0f} MiB",
                base / ours,
                ">= 20",
                f"abs diff {abs(ours_value - base_value):.1e}; "
                f"flops ratio n/(2d) = {n / (2 * d):.1f}",
            )
        )
    return result


WIDTH_ROWS, WIDTH_SETS, WIDTH_K = 200, ("forget", "retain"), 2


def reference_fit(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The PCA fit replaced: eigendecomposition of the full d x d covariance (mean, (d, k)
    components oriented with the largest loading positive, variances)."""
    n = X.shape[0]
    mean = X.mean(axis=0, dtype=np.float64)
    centred = np.subtract(X, mean, dtype=np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / (n - 1))
    top = np.argsort(eigenvalues)[::-1][:k]
    components = eigenvectors[:, top]
    largest = np.abs(components).argmax(axis=0)
    components *= np.sign(components[largest, np.arange(k)])
    return mean, components, np.clip(eigenvalues[top], 0.0, None)


def reference_values(X: np.ndarray, Y: np.ndarray, k: int) -> dict[str, float]:
    """One layer's activation metrics as the metrics stage computed them before issue 15:
    feature-space CKA, then pca_similarity (k = 1, then k), pca_distance and pca_shift, each
    fitting its own PCA (six fits)."""
    accumulator = CKAAccumulator(X.shape[1], Y.shape[1], debiased=True)
    accumulator.update(X, Y)
    values = {"cka": accumulator.result(debiased=False), "cka_debiased": accumulator.result()}
    for name, rank in (("pca_similarity", 1), (f"pca_similarity_top{k}", k)):
        ux, uy = reference_fit(X, rank)[1], reference_fit(Y, rank)[1]
        values[name] = float(np.clip(np.linalg.svd(ux.T @ uy, compute_uv=False), 0, 1).mean())
    offset = Y.mean(axis=0, dtype=np.float64) - X.mean(axis=0, dtype=np.float64)
    _, components, variances = reference_fit(X, k)
    values["pca_distance"] = float(np.linalg.norm(offset @ components) / np.sqrt(variances.sum()))
    _, components, variances = reference_fit(X, k)
    shifts = offset @ components
    for c, (shift, variance) in enumerate(zip(shifts, variances, strict=True), start=1):
        values[f"pca_shift_pc{c}"] = float(shift)
        values[f"pca_shift_pc{c}_norm"] = float(shift / np.sqrt(variance))
    return values


def wide_layer(rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
    """One layer's paired float32 activations: X with a decaying spectrum around a random
    centroid, Y = X plus a rank-one edit, a mean shift and noise (O(n d) to make)."""
    X = rng.standard_normal((WIDTH_ROWS, d)) * np.geomspace(3.0, 0.05, d) + rng.normal(size=d)
    edit = (X @ rng.normal(size=d) / np.sqrt(d))[:, None] * rng.normal(size=d) * 0.3
    Y = X + edit + 0.05 + 0.1 * rng.standard_normal((WIDTH_ROWS, d))
    return X.astype(np.float32), Y.astype(np.float32)


def write_layers(folders: tuple[Path, Path], d: int, layers: int) -> None:
    """Random activations of every probe set and layer, as the extract stage stores them."""
    rng = np.random.default_rng(0)
    schema = activations.activation_schema(d, "float32", per_token=False)
    for probe_set in WIDTH_SETS:
        for layer in range(layers):
            for folder, values in zip(folders, wide_layer(rng, d), strict=True):
                path = activations.layer_path(folder, probe_set, layer)
                path.parent.mkdir(parents=True, exist_ok=True)
                column = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), d)
                rows = pa.array(np.arange(WIDTH_ROWS))
                pq.write_table(pa.Table.from_arrays([rows, column], schema=schema), path)


def value_diff(ours: dict[str, float], reference: dict[str, float]) -> tuple[float, float]:
    """(max abs diff, max rel diff) over the reference's metrics; the names must match."""
    if list(ours) != list(reference):
        raise AssertionError(f"metrics differ: {list(ours)} vs {list(reference)}")
    diffs = [abs(ours[m] - v) for m, v in reference.items()]
    rels = [diff / max(abs(v), 1e-12) for diff, v in zip(diffs, reference.values(), strict=True)]
    return max(diffs), max(rels)


def bench_width(sizes: Sizes, reference_layers: int) -> list[Row]:
    """The metrics stage's activation metrics (table.activation_rows, Parquet reads included)
    at d = ``width_d`` against the reference on ``reference_layers`` of its layers; then one
    layer in memory at each smaller width of ``layer_ds``."""
    d, layers = sizes.width_d, sizes.width_layers
    with tempfile.TemporaryDirectory() as tmp:
        folders = (Path(tmp) / "x", Path(tmp) / "y")
        write_layers(folders, d, layers)
        start = time.perf_counter()
        rows = table.activation_rows(*folders, list(WIDTH_SETS), list(range(layers)), WIDTH_K)
        ours = time.perf_counter() - start
        checked = [(probe_set, layer) for probe_set in WIDTH_SETS for layer in range(layers)]
        diffs, spent = [], 0.0
        for probe_set, layer in checked[:reference_layers]:
            X, Y = (
                activations.read_layer(activations.layer_path(f, probe_set, layer)) for f in folders
            )
            start = time.perf_counter()
            reference = reference_values(X, Y, WIDTH_K)
            spent += time.perf_counter() - start
            mine = {
                r["metric"]: r["value"]
                for r in rows
                if (r["probe_set"], r["layer"]) == (probe_set, layer)
            }
            diffs.append(value_diff(mine, reference))
    per_layer, count = spent / len(diffs), len(checked)
    result = [
        Row(
            f"metrics stage, activation metrics: {layers} layers x {len(WIDTH_SETS)} probe sets, "
            f"n={WIDTH_ROWS}, d={d}, float32 Parquet",
            f"{ours:.1f} s",
            f"{per_layer * count:.0f} s (est.: {per_layer:.1f} s/layer x {count})",
            per_layer * count / ours,
            "< 30 s",
            f"{len(diffs)} layer(s) against the reference: max abs diff "
            f"{max(a for a, _ in diffs):.1e}, max rel diff {max(r for _, r in diffs):.1e}",
        )
    ]
    rng = np.random.default_rng(1)
    for width in sizes.layer_ds:
        X, Y = wide_layer(rng, width)
        mine, ours, ours_peak = measure(lambda X=X, Y=Y: table.layer_values(X, Y, WIDTH_K))
        reference, base, base_peak = measure(lambda X=X, Y=Y: reference_values(X, Y, WIDTH_K))
        diff, rel = value_diff(mine, reference)
        result.append(
            Row(
                f"the same, one layer in memory, n={WIDTH_ROWS}, d={width}",
                f"{ours:.2f} s, {ours_peak / 2**20:.0f} MiB",
                f"{base:.2f} s, {base_peak / 2**20:.0f} MiB",
                base / ours,
                "info",
                f"max abs diff {diff:.1e}, max rel diff {rel:.1e}",
            )
        )
    return result


def fisher_batch(vocab: int, size: int, length: int, device: str) -> dict[str, torch.Tensor]:
    """Right-padded batch, lengths from 2/3 of ``length`` to ``length``, 8 prompt tokens."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, vocab, (size, length), generator=generator)
    lengths = torch.linspace(2 * length // 3, length, size).long()
    positions = torch.arange(length)[None, :]
    attention_mask = (positions < lengths[:, None]).long()
    labels = input_ids.masked_fill((attention_mask == 0) | (positions < 8), -100)
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {key: value.to(device) for key, value in batch.items()}


def answer_log_prob(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of answer-token log-probabilities (labels != -100) over the batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    return logits[:, :-1].log_softmax(-1)[keep, targets[keep]].sum()


def by_layer_on_cpu(
    model: LlamaForCausalLM, values: dict[str, torch.Tensor]
) -> dict[int, torch.Tensor]:
    """Per-parameter tensors in fisher_diagonal's output form: flat float32 CPU tensor per layer."""
    return {
        layer: torch.cat([values[name].ravel() for name, _ in params]).float().cpu()
        for layer, params in layer_parameters(model).items()
    }


def looped_fisher(
    model: LlamaForCausalLM, batch: dict[str, torch.Tensor]
) -> dict[int, torch.Tensor]:
    """The naive route: one backward pass per sample, squaring each sample's gradient; same
    output as fisher_diagonal (so both pay the copy to the CPU)."""
    sums = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    size = batch["input_ids"].shape[0]
    for row in range(size):
        model.zero_grad()
        answer_log_prob(
            model, {key: value[row : row + 1] for key, value in batch.items()}
        ).backward()
        for name, param in model.named_parameters():
            sums[name] += param.grad.square()
    return by_layer_on_cpu(model, {name: total / size for name, total in sums.items()})


def bench_fisher(sizes: Sizes, model_size: str, device: str, attention: str) -> list[Row]:
    torch.manual_seed(0)
    config = LlamaConfig(
        **MODELS[model_size], tie_word_embeddings=True, attn_implementation=attention
    )
    model = LlamaForCausalLM(config).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    batch = fisher_batch(config.vocab_size, 16, 24, device)

    def timed(run: Callable[[], object]) -> float:
        def synced() -> object:
            out = run()
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        synced()
        return best_time(synced, max(sizes.repeats, 3))

    def batched_backward() -> dict[int, torch.Tensor]:
        model.zero_grad()
        answer_log_prob(model, batch).backward()
        return by_layer_on_cpu(model, {name: p.grad for name, p in model.named_parameters()})

    ours = timed(lambda: fisher_diagonal(model, [batch]))
    loop = timed(lambda: looped_fisher(model, batch))
    bound = timed(batched_backward)
    fisher = torch.cat(list(fisher_diagonal(model, [batch]).values()))
    reference = torch.cat(list(looped_fisher(model, batch).values()))
    error = float((fisher - reference).abs().max() / reference.abs().max())
    label = (
        f"{n_params / 1e6:.1f}M-param Llama, {attention} attention, batch 16, length 24, {device}"
    )
    return [
        Row(
            f"per-sample Fisher (vmap) vs loop of 16 backward passes, {label}",
            f"{ours * 1e3:.1f} ms",
            f"{loop * 1e3:.1f} ms",
            loop / ours,
            ">= 3",
            f"max rel. diff {error:.1e}",
        ),
        Row(
            f"bound: one batched backward of 16 (no per-sample grads) vs the loop, {label}",
            f"{bound * 1e3:.1f} ms",
            f"{loop * 1e3:.1f} ms",
            loop / bound,
            "info",
            "the most any per-sample method could gain over the loop; all three include the "
            "copy of P float32 values to the CPU",
        ),
    ]


def markdown(rows: list[Row]) -> str:
    lines = [
        "| benchmark | ours | baseline | ratio | target | note |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r.name} | {r.ours} | {r.baseline} | {r.ratio:.2f} | {r.target} | {r.note} |"
        for r in rows
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model-size", default="0.9m", choices=sorted(MODELS))
    parser.add_argument("--threads", type=int, default=1, help="BLAS and torch threads")
    parser.add_argument(
        "--only", choices=["cka", "width", "fisher"], help="run one group of benchmarks"
    )
    parser.add_argument(
        "--reference-layers",
        type=int,
        default=1,
        help="layers the width benchmark's reference runs on (about a minute each at d=4096)",
    )
    args = parser.parse_args()
    sizes = Sizes.pick(args.quick)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="There is a performance drop")
    stages: list[tuple[str, str, Callable[[], list[Row]]]] = [
        ("cka", "streaming", lambda: bench_streaming(sizes)),
        ("cka", "memory", lambda: [bench_memory(sizes)]),
        ("cka", "gram", lambda: bench_gram(sizes)),
        ("width", "7B width", lambda: bench_width(sizes, args.reference_layers)),
    ]
    stages += [
        ("fisher", attention, partial(bench_fisher, sizes, args.model_size, args.device, attention))
        for attention in ("sdpa", "eager")
    ]
    rows: list[Row] = []
    with threadpool_limits(args.threads):
        for group, name, stage in stages:
            if args.only in (None, group):
                start = time.perf_counter()
                rows += stage()
                print(f"# {group} {name}: {time.perf_counter() - start:.0f} s", flush=True)
    print(markdown(rows))


if __name__ == "__main__":
    main()
