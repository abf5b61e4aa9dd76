"""Time and peak memory of one unlearning step per method on the embedded model.

Each method runs in a fresh subprocess so its peak memory (max RSS on CPU, max allocated on
CUDA) is its own. Prints a Markdown table. Not run in CI.

    python bench/bench_unlearning.py [--steps 20] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time


def one_method(method: str, steps: int, device: str) -> dict:
    """Median seconds per step and peak memory of ``method`` (runs in this process)."""
    import torch

    from unlearning_audit import corpus, data, embedded, runtime, training, unlearning
    from unlearning_audit.config import EmbeddedConfig, UnlearnConfig

    dev = runtime.setup(0, device)
    config = EmbeddedConfig()
    facts, forget = corpus.embedded(config)
    sets = data.embedded_sets(facts, forget, "text")
    tokenizer = embedded.train_tokenizer(facts, config.vocab_size)
    model = embedded.build_model(tokenizer, config).to(dev)
    cfg = UnlearnConfig(method=method, steps=steps, batch_size=16)
    reference = unlearning.make_reference(model, cfg)
    loss = unlearning.method_loss(cfg)
    forget_rows = unlearning.relabel(sets["forget"], 0) if method == "RLabel" else sets["forget"]
    f = data.shuffled_batches(forget_rows, 16, 0)
    r = data.shuffled_batches(sets["retain"], 16, 1)
    batches = iter(
        lambda: {
            "forget": training.to_device(data.train_batch(tokenizer, next(f)), dev),
            "retain": training.to_device(data.train_batch(tokenizer, next(r)), dev),
        },
        None,
    )
    times = []

    def clock(step: int) -> bool:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        return False

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times.append(time.perf_counter())
    training.fit(model, lambda m, b: loss(m, reference, b), batches, steps, cfg.lr, clock)
    per_step = sorted(b - a for a, b in itertools.pairwise(times))[len(times) // 2 - 1]
    peak = (
        torch.cuda.max_memory_allocated()
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {"method": method, "ms_per_step": 1000 * per_step, "peak_mib": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(one_method(args.method, args.steps, args.device)))
        return
    from unlearning_audit.config import METHODS

    print(f"| method | ms per step (median of {args.steps}, batch 16+16) | peak memory MiB |")
    print("|---|---|---|")
    for method in METHODS:
        out = (
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--method",
                    method,
                    "--steps",
                    str(args.steps),
                    "--device",
                    args.device,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        row = json.loads(out)
        print(f"| {method} | {row['ms_per_step']:.1f} | {row['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
