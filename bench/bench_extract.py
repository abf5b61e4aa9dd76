"""Activation extraction to Parquet against the same forward passes with no capture.

Target (issue 4): extraction keeps at least 80% of the plain forward passes' throughput. Both
run the same batches of real prompts through a Llama built locally from config (the embedded
size, or ~100M parameters with --model-size 100m), alternately, best of --repeats each (a shared
machine's speed drifts; alternating lets both see the same drift). Not run in CI.

A second table times the Parquet writer alone on rows of the model's shape (every layer's
mean-pooled vector, standard normal values: the least compressible case), with one thread and
with one per layer up to the machine's cores: on a GPU the writer, not the forward pass, is what
can fall behind.

    python bench/bench_extract.py [--rows 2048] [--batch 64] [--device cpu|cuda]
                                  [--model-size 0.9m|100m]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from bench_metrics import MODELS, best_time

from unlearning_audit import activations, corpus, data, embedded, runtime
from unlearning_audit.config import EmbeddedConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-size", default="0.9m", choices=sorted(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    args = parser.parse_args()
    device = runtime.setup(0, args.device)
    facts, _ = corpus.embedded(EmbeddedConfig())
    tokenizer = embedded.train_tokenizer(facts, 1024)
    rows = [{"question": f.question, "answer": f.answer} for f in facts]
    rows = (rows * (args.rows // len(rows) + 1))[: args.rows]
    model = LlamaForCausalLM(LlamaConfig(**MODELS[args.model_size])).to(device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    batches = [
        {k: v.to(device) for k, v in data.prompt_batch(tokenizer, chunk).items()}
        for chunk in data.chunks(rows, args.batch)
    ]

    @torch.no_grad()
    def forward_only() -> None:
        for batch in batches:
            model(**batch)
        _sync(device)

    def extract() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            activations.extract(
                model,
                tokenizer,
                {"probe": rows},
                Path(tmp),
                batch_size=args.batch,
                dtype=args.dtype,
            )
            _sync(device)

    forward_only(), extract()  # warm-up
    plain, captured = (
        min(times)
        for times in zip(
            *((best_time(forward_only, 1), best_time(extract, 1)) for _ in range(args.repeats)),
            strict=True,
        )
    )
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU, 1 thread"
    print("| model | device | rows | forward only rows/s | extract to Parquet rows/s | ratio |")
    print("|---|---|---|---|---|---|")
    layers = model.config.num_hidden_layers + 1
    print(
        f"| Llama {n_params:.1f}M, {layers} layers captured | {name} | {len(rows)} | "
        f"{len(rows) / plain:.0f} | {len(rows) / captured:.0f} | "
        f"{plain / captured:.2f} (target >= 0.8) |"
    )
    dim, cores = model.config.hidden_size, os.cpu_count() or 1
    print(f"\n| Parquet writer alone, {layers} layers x {dim} float32 | threads | rows/s |")
    print("|---|---|---|")
    for threads in sorted({1, min(layers, cores)}):
        speed = writer_throughput(layers, dim, 32_768, threads, args.repeats)
        print(f"| this host, {cores} cores | {threads} | {speed:.0f} |")


def writer_throughput(layers: int, dim: int, rows: int, threads: int, repeats: int) -> float:
    """Rows per second that LayerWriters sustains for ``layers`` float32 columns of ``dim``."""
    rng = np.random.default_rng(0)
    batch = 64
    values = {layer: rng.standard_normal((batch, dim), dtype=np.float32) for layer in range(layers)}
    schema = activations.activation_schema(dim, "float32", per_token=False)

    def write() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            writers = activations.LayerWriters(
                Path(tmp), "probe", list(range(layers)), schema, 8192, threads
            )
            for start in range(0, rows, batch):
                writers.add([pa.array(np.arange(start, start + batch))], values)
            writers.close()

    return rows / best_time(write, repeats)


if __name__ == "__main__":
    main()
