"""Memory and time per stage over model size: measured on CPU for small random Llamas, and the
estimator's figures (unlearning_audit/plan.py) for 1B, 7B and 70B-class models built on the
meta device from their configs (nothing downloaded). Not run in CI.

Measured: each stage (GA, NPO+KL, relearning, Fisher, extraction) runs in a fresh process on a
random-init Llama saved to a temporary folder; its peak is the extra resident memory over the
loaded model (tests/peak_memory.py), beside the estimate's extra (its peak less the weights).
Training runs in fp32, bf16-mixed and with LoRA (rank 16) where the code supports it.

    PYTHONPATH=. python bench/bench_scale.py [--out bench/results/cpu_scale.md] [--quick]
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import peak_memory  # noqa: E402

from unlearning_audit import plan, relearning  # noqa: E402
from unlearning_audit.config import (  # noqa: E402
    METHODS,
    AuditParams,
    RelearnConfig,
    UnlearnConfig,
)

GIB = 2**30
SMALL = {
    "7M": {"hidden": 256, "layers": 4, "intermediate": 688, "vocab": 8000},
    "24M": {"hidden": 512, "layers": 5, "intermediate": 1376, "vocab": 8000},
}
BATCH = 8
LORA = 16
SEQUENCE = 256
"""Tokens per row assumed for the large models (a TOFU question and answer in a chat template
take about 100 to 250)."""
BUDGETS = {"80 GB GPU": int(79.1 * GIB), "141 GB GPU": int(139 * GIB)}
"""What torch reports as total_memory: an 80 GB H100 or A100 has 79.1 GiB, a 141 GB H200 about
139."""


def large_configs() -> dict:
    """Llama configs of 1B, 7B and 70B-class models (bf16 checkpoints)."""
    from transformers import LlamaConfig

    common = {"dtype": "bfloat16", "max_position_embeddings": 4096}
    return {
        "1B (Llama-3.2-1B)": LlamaConfig(
            hidden_size=2048,
            num_hidden_layers=16,
            intermediate_size=8192,
            vocab_size=128256,
            num_attention_heads=32,
            num_key_value_heads=8,
            tie_word_embeddings=True,
            **common,
        ),
        "7B (Llama-2-7B)": LlamaConfig(
            hidden_size=4096,
            num_hidden_layers=32,
            intermediate_size=11008,
            vocab_size=32000,
            num_attention_heads=32,
            num_key_value_heads=32,
            **common,
        ),
        "70B (Llama-3-70B)": LlamaConfig(
            hidden_size=8192,
            num_hidden_layers=80,
            intermediate_size=28672,
            vocab_size=128256,
            num_attention_heads=64,
            num_key_value_heads=8,
            **common,
        ),
    }


def six_method_audit(**update) -> AuditParams:
    """A 6-method audit of a large checkpoint with a never-learned control, every other
    setting at its default (relearning from forget and forget-half, 3 seeds, Fisher at batch
    16 over all layers, 8- and 4-bit quantization)."""
    return AuditParams(
        original="org/model@main",
        control="org/control@main",
        methods=[UnlearnConfig(method=m, lr=1e-5) for m in METHODS],
        **update,
    )


SCENARIOS = {
    "defaults": {},
    "--gradient-checkpointing": {"gradient_checkpointing": True},
    "--lora 16": {"lora": True},
    "--lora 16 --fisher-batch-size 1": {"lora": True, "fisher_batch_size": 1},
    "--gradient-checkpointing --fisher-batch-size 1": {
        "gradient_checkpointing": True,
        "fisher_batch_size": 1,
    },
    "--gpus 8 --lora 16 --gradient-checkpointing --fisher-batch-size 1": {
        "gpus": 8,
        "lora": True,
        "gradient_checkpointing": True,
        "fisher_batch_size": 1,
    },
}


def scenario(settings: dict) -> AuditParams:
    """The 6-method audit under ``settings`` (``lora``: every run at rank 16, as --lora)."""
    params = six_method_audit(**{k: v for k, v in settings.items() if k != "lora"})
    if not settings.get("lora"):
        return params
    lora = {"lora_rank": LORA}
    return params.model_copy(
        update={
            "methods": [m.model_copy(update=lora) for m in params.methods],
            "relearn": params.relearn.model_copy(update=lora),
        }
    )


def estimator_section() -> list[str]:
    """Markdown: per model, each stage's peak per GPU under each scenario (bf16-mixed), the
    scenarios' largest stage against the budgets, the settings that fit each budget, and the
    store footprint."""
    lines = []
    for name, config in large_configs().items():
        start = time.perf_counter()
        shape = plan.shape_of(config)
        built = time.perf_counter() - start
        plans = {
            label: plan.plan(scenario(s), shape, SEQUENCE, "bf16-mixed", None)
            for label, s in SCENARIOS.items()
        }
        lines += [
            f"### {name}: {shape.parameters / 1e9:.2f}B parameters, bf16 "
            f"(built on meta in {built:.1f} s)",
            "",
            "Peak per GPU (GiB), bf16-mixed training, "
            f"{SEQUENCE} tokens per row, batch sizes at their defaults (unlearning 16, "
            "relearning 8, Fisher 16):",
            "",
            "| stage | " + " | ".join(plans) + " |",
            "| --- |" + " --- |" * len(plans),
        ]
        names = [s.stage.split(" lr=")[0] for s in plans["defaults"].stages]
        for i, stage in enumerate(names):
            cells = [f"{p.stages[i].peak / GIB:.1f}" for p in plans.values()]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        worst = [max(p.stages, key=lambda s: s.peak) for p in plans.values()]
        lines.append(
            "| **largest** | " + " | ".join(f"**{w.peak / GIB:.1f}**" for w in worst) + " |"
        )
        for budget_name, budget in BUDGETS.items():
            fits = ["yes" if w.peak <= budget else "no" for w in worst]
            lines.append(f"| fits one {budget_name} | " + " | ".join(fits) + " |")
        lines.append("")
        for budget_name, budget in BUDGETS.items():
            if worst[0].peak <= budget:
                lines.append(f"- the defaults fit one {budget_name} ({budget / GIB:.1f} GiB)")
                continue
            fitting = plan.fitting_settings(
                six_method_audit(), shape, SEQUENCE, "bf16-mixed", budget
            )
            lines.append(
                f"- settings under which the 6-method audit fits {budget_name}s "
                f"({budget / GIB:.1f} GiB each), from the defaults (plan.fitting_settings): "
                + ("; ".join(f"`{f}`" for f in fitting) or "none")
            )
        lines += ["", "Store footprint (GiB):", ""]
        stores = {
            "defaults": six_method_audit(),
            "--lora 16 (adapters stored, not merged checkpoints)": plan.with_lora(
                six_method_audit()
            ),
            "--keep-relearned": six_method_audit(keep_relearned=True),
            "--fisher-layers 1 (one block's Fisher)": six_method_audit(fisher_layers=[1]),
            "--no-fisher": six_method_audit(fisher=False),
        }
        kinds = list(plan.store_estimate(six_method_audit(), shape))
        lines += ["| store | " + " | ".join(kinds) + " | total |"]
        lines.append("| --- |" + " --- |" * (len(kinds) + 1))
        for label, audit in stores.items():
            store = plan.store_estimate(audit, shape)
            cells = [f"{v / GIB:.1f}" for v in store.values()]
            lines.append(
                f"| {label} | " + " | ".join(cells) + f" | **{sum(store.values()) / GIB:.1f}** |"
            )
        lines.append("")
    return lines


def summary_table() -> list[str]:
    """Markdown for the README: per model, the default audit's main stages and its largest
    stage under the settings that matter, and the store footprint (GiB)."""
    lines = [
        "| model | evaluate | unlearn NPO+KL | relearn | Fisher | largest stage: defaults | "
        "`--lora 16 --fisher-batch-size 1` | `--gradient-checkpointing --fisher-batch-size 1` "
        "| `--gpus 8 --lora 16 --gradient-checkpointing --fisher-batch-size 1` | store: "
        "defaults | store: `--lora 16` |",
        "| --- |" + " --- |" * 10,
    ]
    for name, config in large_configs().items():
        shape = plan.shape_of(config)

        stages = {
            s.stage.split(" lr=")[0]: s.peak
            for s in plan.plan(six_method_audit(), shape, SEQUENCE, "bf16-mixed", None).stages
        }
        main = [stages[k] / GIB for k in ("evaluate", "unlearn NPO+KL", "relearn", "fisher")]
        stores = [
            sum(plan.store_estimate(audit, shape).values()) / GIB
            for audit in (six_method_audit(), plan.with_lora(six_method_audit()))
        ]
        lines.append(
            f"| {name}, {shape.parameters / 1e9:.2f}B | "
            + " | ".join(f"{v:.0f}" for v in main)
            + " | "
            + " | ".join(
                f"{_largest(shape, k) / GIB:.0f}"
                for k in [*list(SCENARIOS)[:1], *list(SCENARIOS)[3:]]
            )
            + " | "
            + " | ".join(f"{v:.0f}" for v in stores)
            + " |"
        )
    return lines


def _largest(shape, label: str) -> int:
    """The largest stage peak of the 6-method audit under scenario ``label``."""
    estimate = plan.plan(scenario(SCENARIOS[label]), shape, SEQUENCE, "bf16-mixed", None)
    return max(s.peak for s in estimate.stages)


def measured_section(quick: bool) -> list[str]:
    """Markdown: each stage's measured extra peak, the estimate's and time, on CPU."""
    lora_relearn = "lora_rank" in inspect.getsource(relearning)
    runs = [("fp32", None, s) for s in peak_memory.STAGES]
    runs += [("bf16-mixed", None, s) for s in ("GA", "NPO+KL", "relearn")]
    runs += [("fp32", LORA, s) for s in ("GA", "NPO+KL", "relearn")]
    lines = [
        f"Batches of {BATCH} rows of about 73 tokens, 3 training steps; seconds: the stage's wall "
        "time in its process, one torch thread.",
        "",
        "| model | training | stage | measured extra peak | estimated extra | estimate / "
        "measured | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    sizes = {"24M": SMALL["24M"]} if quick else SMALL
    with tempfile.TemporaryDirectory() as tmp:
        for size, dims in sizes.items():
            folder = peak_memory.build_checkpoint(Path(tmp) / size, **dims)
            shape = plan.shape_of_folder(folder)
            for precision, lora, stage in runs if size == "24M" else runs[:5]:
                mode = f"LoRA {lora}" if lora else precision
                if lora and stage == "relearn" and not lora_relearn:
                    lines.append(f"| {size} | {mode} | {stage} | pending | | | |")
                    continue
                options = {"batch_size": BATCH, "steps": 3, "precision": precision}
                if lora:
                    options["lora_rank"] = lora
                got = peak_memory.measure(folder, stage, options)
                estimate = _estimate(shape, stage, got, precision, lora)
                extra = estimate.peak - shape.parameters * shape.dtype_bytes
                lines.append(
                    f"| {size} | {mode} | {stage} | {got['extra'] / 2**20:.0f} MiB | "
                    f"{extra / 2**20:.0f} MiB | {extra / got['extra']:.2f} | "
                    f"{got['seconds']:.1f} |"
                )
                print(lines[-1], flush=True)
    return lines


def _estimate(shape, stage: str, got: dict, precision: str, lora: int | None):
    """The estimator's figure for one measured run (tests/peak_memory.py's settings)."""
    compute = plan.Compute(precision)
    if stage in ("GA", "NPO+KL"):
        config = UnlearnConfig(method=stage, batch_size=BATCH, lora_rank=lora)
        return plan.unlearn_estimate(shape, config, got["seq"], compute)
    if stage == "relearn":
        config = RelearnConfig(batch_size=BATCH, lora_rank=lora)
        return plan.relearn_estimate(shape, config, got["seq"], compute, eval_rows=32)
    if stage == "fisher":
        return plan.fisher_estimate(shape, BATCH, None, got["seq"])
    return plan.extract_estimate(shape, got["prompt"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the Markdown results here")
    parser.add_argument("--quick", action="store_true", help="the 24M model only")
    args = parser.parse_args()
    lines = [
        "## Estimated, large models (plan.py)",
        "",
        "Summary (GiB per GPU, bf16-mixed; the README's table):",
        "",
        *summary_table(),
        "",
        *estimator_section(),
    ]
    print("\n".join(lines), flush=True)
    lines += ["## Measured on CPU", "", *measured_section(args.quick), ""]
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
