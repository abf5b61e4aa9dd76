"""Peak memory of one stage's work on CPU, measured in a fresh process, for tests/test_plan.py
and bench/bench_scale.py.

The measure is the stage's extra peak resident memory over the loaded model: the process loads
the checkpoint, warms up on two rows (a forward pass, and an extraction to Parquet: thread
pools, allocator arenas and Arrow's memory pool take their memory then, whatever the model's
size), reads VmRSS, resets the peak (writing 5 to /proc/self/clear_refs sets VmHWM to the
current RSS: Linux 4.0 and later), runs the stage and reads VmHWM. Unlike ru_maxrss, whose peak
includes importing torch and loading the model and cannot be reset, this isolates the stage.
The process runs with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_): every
tensor's block is then mapped and unmapped with the tensor, so the high-water mark follows the
tensors alive at once, as a GPU's allocated memory does. By default the threshold adapts up to
32 MiB once a block that size is freed, and later blocks below it stay in the heap when freed:
LoRA training measured 150 MiB more that way, memory the process kept but no tensor held.

    python tests/peak_memory.py FOLDER STAGE '{"batch_size": 8, ...}'   (prints JSON)

Options: batch_size (8), steps (3), precision (fp32), lora_rank (none), rows per set (32),
repeat (3: each question repeated, for longer rows), layers (Fisher: all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("GA", "NPO+KL", "relearn", "fisher", "extract")


def build_checkpoint(
    folder: Path,
    hidden: int = 512,
    layers: int = 5,
    intermediate: int = 1376,
    vocab: int = 8000,
    dtype: str = "float32",
) -> Path:
    """Save a randomly initialised Llama (about 24M parameters by default) with the embedded
    model's tokenizer to ``folder`` (checkpoints.save)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from unlearning_audit import checkpoints, corpus, embedded

    tokenizer = embedded.train_tokenizer(corpus.generate(0, {"text": 20}), 512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).to(getattr(torch, dtype))
    checkpoints.save(model, tokenizer, folder)
    return folder


def probe_sets(rows: int = 32, repeat: int = 3) -> dict[str, list[dict]]:
    """Forget, retain and unrelated sets (and the forget halves) of ``rows`` rows each, every
    question the embedded corpus's repeated ``repeat`` times (rows of about 20 x repeat
    tokens)."""
    from unlearning_audit import corpus

    facts = corpus.generate(1, {"text": 4 * rows // 5 + 1})[: 3 * rows]
    made = [
        {"id": i, "question": " ".join([f.question] * repeat), "answer": f.answer, "group": f.group}
        for i, f in enumerate(facts)
    ]
    sets = {name: made[k * rows : (k + 1) * rows] for k, name in enumerate(("forget", "retain"))}
    sets["unrelated"] = made[2 * rows :]
    sets["forget_a"], sets["forget_b"] = sets["forget"][::2], sets["forget"][1::2]
    return sets


def measure(folder: Path, stage: str, options: dict) -> dict:
    """Run ``stage`` (one of STAGES) on the checkpoint in ``folder`` in a fresh process;
    returns its extra peak bytes over the loaded model (``extra``), seconds, and the rendered
    sequence length (``seq``, the longest row; ``prompt``, the longest prompt)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "UNLEARNING_AUDIT_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    out = subprocess.run(
        [sys.executable, __file__, str(folder), stage, json.dumps(options)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"{stage} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status(key: str) -> int:
    """A /proc/self/status memory figure, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _run(folder: Path, stage: str, options: dict) -> dict:
    """Load, warm up, reset the peak, run ``stage``; the measurement (see the module doc)."""
    import gc

    import torch

    from unlearning_audit import activations, checkpoints, data, prompts, relearning, runtime
    from unlearning_audit import unlearning as unl
    from unlearning_audit.config import RelearnConfig, UnlearnConfig
    from unlearning_audit.evaluation import score_rows
    from unlearning_audit.metrics.fisher import fisher_diagonal
    from unlearning_audit.plan import sequence_length

    runtime.setup(0, "cpu")
    model, tokenizer = checkpoints.load(folder, "cpu")
    fmt = prompts.renderer(tokenizer, "auto", "\n")
    sets = probe_sets(options.get("rows", 32), options.get("repeat", 3))
    batch = options.get("batch_size", 8)
    precision = options.get("precision", "fp32")
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        score_rows(model, fmt, sets["forget"][:2])
        activations.extract(model, fmt, {"forget": sets["forget"][:2]}, Path(tmp))
    gc.collect()
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    steps, lora = options.get("steps", 3), options.get("lora_rank")
    if stage in ("GA", "NPO+KL"):
        cfg = UnlearnConfig(method=stage, lr=1e-5, steps=steps, batch_size=batch, lora_rank=lora)
        unl.unlearn(model, fmt, sets, cfg, 0, precision=precision)
    elif stage == "relearn":
        cfg = RelearnConfig(
            lr=1e-5, batch_size=batch, budget=steps * batch / len(sets["forget"]), lora_rank=lora
        )
        relearning.relearn(model, fmt, sets, "forget", cfg, 0, None, 32, 0, precision)
    elif stage == "fisher":
        batches = (data.train_batch(fmt, c) for c in data.chunks(sets["forget"][:batch], batch))
        fisher_diagonal(model, batches, options.get("layers"))
    elif stage == "extract":
        with tempfile.TemporaryDirectory() as tmp:
            activations.extract(model, fmt, {"forget": sets["forget"]}, Path(tmp))
    else:
        raise ValueError(f"unknown stage {stage!r}; known: {STAGES}")
    seconds = time.perf_counter() - start
    prompt = max(len(e.prompt) for e in fmt.encode(sets["forget"]))
    return {
        "extra": _status("VmHWM") - base,
        "seconds": seconds,
        "seq": sequence_length(fmt, {"forget": sets["forget"]}),
        "prompt": prompt,
    }


if __name__ == "__main__":
    print(json.dumps(_run(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]))))
