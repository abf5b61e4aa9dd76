"""Memory and time per stage over model size: measured on CPU for small random Llamas, and the
estimator's figures (unlearning_audit/plan.py) for 1B, 7B and 70B-class models built on the
meta device from their configs (nothing downloaded). Not run in CI.

Measured: each stage (GA, NPO+KL, relearning, Fisher, extraction) runs in a fresh process on a
random-init Llama saved to a temporary folder; its peak is the extra resident memory over the
loaded model (tests/peak_memory.py), beside the estimate's extra (its peak less the weights).
Training runs in fp32, bf16-mixed and with LoRA (rank 16) where the code supports it.

    PYTHONPATH=. python bench/bench_scale.py [--out bench/results/cpu_scale.md] [--quick]
    PYTHONPATH=. python bench/bench_scale.py --estimates-only   (the estimator alone, seconds)
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
from large_models import large_configs, six_method_audit  # noqa: E402

from unlearning_audit import plan, relearning  # noqa: E402
from unlearning_audit.config import AuditParams, RelearnConfig, UnlearnConfig  # noqa: E402

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


SCENARIOS = {
    "defaults": {},
    "--lora 16": {"lora": True},
    "--gpus 8": {"gpus": 8},
    "--gpus 8 --lora 16 --no-fisher": {"gpus": 8, "lora": True, "fisher": False},
}
"""The settings compared; gradient checkpointing and the Fisher's samples per pass are left to
auto in each (chosen for the device budget)."""


def scenario(settings: dict) -> AuditParams:
    """The 6-method audit under ``settings`` (``lora``: every run at rank 16, as --lora)."""
    params = six_method_audit(**{k: v for k, v in settings.items() if k != "lora"})
    return plan.with_lora(params) if settings.get("lora") else params


def _plans(shape, budget: int | None) -> dict[str, plan.Plan]:
    """The plan of each scenario on devices of ``budget`` bytes (None: unknown, auto off)."""
    return {
        label: plan.plan(scenario(s), shape, SEQUENCE, "bf16-mixed", budget)
        for label, s in SCENARIOS.items()
    }


def _cell(stage: plan.StageEstimate) -> str:
    """A stage's peak (GiB) and what auto chose for it: ckpt (checkpointing on), N/pass."""
    chosen = stage.chosen.replace("checkpointing on (auto)", "ckpt")
    chosen = chosen.replace("checkpointing off (auto)", "").replace(" samples per pass", "/pass")
    return f"{stage.peak / GIB:.1f} {chosen}".strip()


def stage_table(shape, budget: int | None) -> list[str]:
    """Markdown: each stage's peak per GPU under each scenario, with what auto chose, on
    devices of ``budget`` bytes; the largest stage, and whether it fits."""
    plans = _plans(shape, budget)
    lines = ["| stage | " + " | ".join(plans) + " |", "| --- |" + " --- |" * len(plans)]
    stages = [{s.stage.split(" lr=")[0]: s for s in p.stages} for p in plans.values()]
    for name in stages[0]:
        cells = [_cell(by_name[name]) if name in by_name else "-" for by_name in stages]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    worst = [max(p.stages, key=lambda s: s.peak) for p in plans.values()]
    lines.append("| **largest** | " + " | ".join(f"**{w.peak / GIB:.1f}**" for w in worst) + " |")
    if budget is not None:
        fits = ["no" if p.too_large() else "yes" for p in plans.values()]
        lines.append("| fits | " + " | ".join(fits) + " |")
    return lines


def estimator_section() -> list[str]:
    """Markdown: per model, each stage's peak per GPU under each scenario (bf16-mixed) with no
    device budget (auto off, the Fisher at 16 samples per pass) and on each budget (auto's
    choices), the settings that fit each budget where the defaults do not, and the store
    footprint."""
    lines = []
    for name, config in large_configs().items():
        start = time.perf_counter()
        shape = plan.shape_of(config)
        built = time.perf_counter() - start
        lines += [
            f"### {name}: {shape.parameters / 1e9:.2f}B parameters, bf16 "
            f"(built on meta in {built:.1f} s)",
            "",
            f"Peak per GPU (GiB), bf16-mixed training, {SEQUENCE} tokens per row, batch sizes at "
            "their defaults (unlearning 16, relearning 8, Fisher at most 16 per pass); ckpt: "
            "gradient checkpointing turned on by auto, N/pass: the Fisher's samples per pass.",
            "",
            "No device budget (auto leaves checkpointing off, the Fisher at 16 per pass):",
            "",
            *stage_table(shape, None),
            "",
        ]
        for budget_name, budget in BUDGETS.items():
            lines += [f"On {budget_name}s ({budget / GIB:.1f} GiB each):", ""]
            lines += [*stage_table(shape, budget), ""]
            if plan.plan(six_method_audit(), shape, SEQUENCE, "bf16-mixed", budget).too_large():
                fitting = plan.fitting_settings(
                    six_method_audit(), shape, SEQUENCE, "bf16-mixed", budget
                )
                found = "; ".join(f"`{f}`" for f in fitting) or "none"
                lines += [f"Settings that fit, from the defaults (plan.fitting_settings): {found}"]
                lines.append("")
        lines += ["Store footprint (GiB):", ""]
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


SUMMARY = {  # column: (budget, scenario)
    "one 80 GB GPU: defaults": ("80 GB GPU", "defaults"),
    "one 80 GB GPU: `--lora 16`": ("80 GB GPU", "--lora 16"),
    "one 141 GB GPU: defaults": ("141 GB GPU", "defaults"),
    "eight 80 GB GPUs: `--gpus 8`": ("80 GB GPU", "--gpus 8"),
    "eight 80 GB GPUs: `--gpus 8 --lora 16 --no-fisher`": (
        "80 GB GPU",
        "--gpus 8 --lora 16 --no-fisher",
    ),
}
"""The README's columns of the largest stage: a budget and a scenario."""


def summary_table() -> list[str]:
    """Markdown for the README: per model, the default audit's main stages without a device
    budget (auto off: no checkpointing, 16 samples per Fisher pass), its largest stage on each
    budget and scenario of SUMMARY with auto's choices (and whether it fits), and the store
    footprint (GiB)."""
    lines = [
        "| model | evaluate | unlearn NPO+KL | relearn | Fisher (16 per pass) | "
        + " | ".join(f"largest stage, {c}" for c in SUMMARY)
        + " | store: defaults | store: `--lora 16` |",
        "| --- |" + " --- |" * (6 + len(SUMMARY)),
    ]
    for name, config in large_configs().items():
        shape = plan.shape_of(config)
        unbudgeted = plan.plan(six_method_audit(), shape, SEQUENCE, "bf16-mixed", None)
        stages = {s.stage.split(" lr=")[0]: s.peak for s in unbudgeted.stages}
        main = [stages[k] / GIB for k in ("evaluate", "unlearn NPO+KL", "relearn", "fisher")]
        largest = []
        for budget_name, label in SUMMARY.values():
            planned = _plans(shape, BUDGETS[budget_name])[label]
            peak = max(s.peak for s in planned.stages) / GIB
            largest.append(f"{peak:.0f} ({'no' if planned.too_large() else 'fits'})")
        stores = [
            sum(plan.store_estimate(audit, shape).values()) / GIB
            for audit in (six_method_audit(), plan.with_lora(six_method_audit()))
        ]
        lines.append(
            f"| {name}, {shape.parameters / 1e9:.2f}B | "
            + " | ".join(f"{v:.0f}" for v in main)
            + " | "
            + " | ".join(largest)
            + " | "
            + " | ".join(f"{v:.0f}" for v in stores)
            + " |"
        )
    return lines


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
    parser.add_argument(
        "--estimates-only",
        action="store_true",
        help="print the estimator's tables alone (seconds), without measuring on CPU",
    )
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
    if args.estimates_only:
        return
    lines += ["## Measured on CPU", "", *measured_section(args.quick), ""]
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
