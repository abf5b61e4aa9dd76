"""Fisher stage (GPU): the diagonal Fisher of a checkpoint on the forget set, empirical (the
data's labels) and the model's (labels drawn from the model; metrics.fisher)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tasks._stage import cached_stage, load_inputs, shape_or_warn, stage_task, write_json
from unlearning_audit import data, plan, prompts, runtime
from unlearning_audit.metrics import fisher as fisher_mod
from unlearning_audit.store import ArtifactRef, Store, code_version

FISHER = "fisher.safetensors"
SUMMARY = "fisher-summary.json"
MODEL_SUMMARY = "fisher-model-summary.json"
"""The model's Fisher, as its per-layer summary alone (the metrics read its means, never its
values: at 7B the values would add 13 GB a checkpoint)."""
STORED_DTYPE = torch.bfloat16
"""The stored values' dtype: half the bytes of float32 with its exponent range, so values as
small as a large model's Fisher holds (1e-20 and below) keep their magnitude, where float16
(smallest subnormal about 6e-8) would flush them to zero; each value rounds by at most 2^-8
(0.4%) of itself."""
HELP = (
    "what helps: fewer layers (--fisher-layers; fisher_layers), a GPU with more memory, or no "
    "Fisher (--no-fisher)"
)
"""The settings that let a Fisher whose one sample does not fit run (or not be asked for)."""


def read_fisher(store: Store, ref: ArtifactRef) -> dict[int, torch.Tensor]:
    """The stored per-layer Fisher tensors as float32, keyed by layer index; none where the
    stage skipped (the metrics stage then adds no Fisher rows)."""
    tensors = load_file(store.local_dir(ref) / FISHER)
    return {int(name.removeprefix("layer.")): value.float() for name, value in tensors.items()}


def read_fisher_summary(
    store: Store, ref: ArtifactRef, labels: fisher_mod.Labels = "empirical"
) -> dict[int, dict]:
    """A Fisher's per-layer summary (metrics.fisher.fisher_summary): the empirical one's stored
    by a summary-only stage, else computed from the stored tensors; the model's (``labels``
    "model") as stored (MODEL_SUMMARY). Empty where the stage skipped, or did not compute the
    model's."""
    folder = store.local_dir(ref)
    name = SUMMARY if labels == "empirical" else MODEL_SUMMARY
    if (folder / name).is_file():
        return {int(layer): entry for layer, entry in store.read_json(ref, name).items()}
    if labels == "model":
        return {}
    return fisher_mod.fisher_summary(read_fisher(store, ref))


def diagonal(
    model,
    fmt: prompts.Renderer,
    rows: list[dict],
    layers: list[int] | None,
    batch_size: int,
    passes: fisher_mod.SamplesPerPass,
    labels: fisher_mod.Labels,
    model_samples: int,
    seed: int,
) -> dict[int, torch.Tensor]:
    """The Fisher of ``rows`` (empirical or the model's: ``labels``) as the stage computes it:
    data batches of ``batch_size`` rows on the model's device, in passes of ``passes``. Neither
    is part of the key: the empirical Fisher changes by float rounding only, and the model's
    label draws take the same random numbers whatever the batches (one seeded CPU generator,
    row after row), though the probabilities they sample can differ by rounding, which can move
    a draw that lies near a boundary (tests/test_fisher_scale.py)."""
    dev = next(model.parameters()).device
    batches = (
        {k: v.to(dev) for k, v in data.train_batch(fmt, chunk).items()}
        for chunk in data.chunks(rows, batch_size)
    )
    return fisher_mod.fisher_diagonal(
        model, batches, layers, passes, labels, max(1, model_samples), seed
    )


def pass_size(
    model,
    fmt: prompts.Renderer,
    rows: list[dict],
    layers: list[int] | None,
    most: int,
    budget: int | None,
) -> int:
    """The samples per pass the stage starts at: plan.fisher_pass for the loaded ``model``'s
    shape, the longest of ``rows`` rendered by ``fmt`` and ``budget``, the memory of the device
    (plan.device_budget; ``most`` where it is unknown, or where the estimator cannot read the
    model, e.g. its own code's config: the passes then halve on out-of-memory). The stage runs
    on one device."""
    if budget is None:
        return most
    shape = shape_or_warn(model, f"the Fisher starts at {most} samples per pass")
    if shape is None:
        return most
    seq = plan.sequence_length(fmt, {"rows": rows})
    return plan.fisher_pass(shape, most, layers, seq, budget)


def _skipped(out: Path, meta: dict, reason: str) -> dict:
    """A skipped stage's artifact: no tensors, ``reason`` in the file's metadata and in the
    manifest's meta (``skipped``)."""
    save_file({}, out / FISHER, metadata={"skipped": reason})
    return {**meta, "skipped": reason}


@stage_task("fisher", "gpu")
def fisher(
    store: str,
    checkpoint: ArtifactRef,
    data_ref: ArtifactRef,
    probe_set: str = "forget",
    max_rows: int = 200,
    layers: list[int] | None = None,
    batch_size: int = 16,
    device: str = "auto",
    trust_remote_code: bool = False,
    summary_only: bool = False,
    model_samples: int = 1,
    seed: int = 0,
):
    """Per-sample-gradient diagonal Fisher of the chosen ``layers`` (None: all), on one probe
    set, stored in bfloat16 (STORED_DTYPE).

    At most ``batch_size`` samples go through one per-sample-gradient pass: the stage starts at
    the largest size the plan says fits its device (pass_size); out of memory, the pass size
    halves (down to one sample) and the stage goes on, the size that fitted in the manifest
    (``samples_per_pass``). The values do not depend on it, nor on ``batch_size`` (see
    diagonal), so neither is part of the key. One sample that does not fit
    (fisher.SampleDoesNotFit) fails the stage at once, naming the memory it needs and the
    settings that help; nothing is stored, so more memory computes it later. A model that gives
    no per-sample gradients (fisher.UnsupportedModel) is skipped: the artifact holds no tensors,
    its reason in the file's metadata and the manifest (``skipped``). With ``summary_only`` the
    stage stores the per-layer summary the metrics read of a candidate's Fisher (SUMMARY: mean,
    quantiles, log10 histogram, from the float32 values), not the values: the original's Fisher
    is the one read value by value (its weighted distance), and at 7B each unlearned model's
    values would take 13 GB. The checkpoint's own model code runs only with
    ``trust_remote_code`` (the audit's parameter; nothing in the store can grant it).
    """

    def build(s, out):
        model, fmt, sets, _ = load_inputs(
            s, checkpoint, data_ref, runtime.setup(0, device), trust_remote_code=trust_remote_code
        )
        rows = data.sample(sets[probe_set], max_rows)
        meta = {
            "probe_set": probe_set,
            "rows": len(rows),
            "layers": layers,
            "dtype": str(model.dtype),
            "stored_dtype": str(STORED_DTYPE),
            "batch_size": batch_size,
            "model_samples": model_samples,
            "seed": seed,
        }
        budget = plan.device_budget(device)
        size = pass_size(model, fmt, rows, layers, batch_size, budget)
        passes = fisher_mod.SamplesPerPass(size)
        fisher_of = functools.partial(
            diagonal,
            model,
            fmt,
            rows,
            layers,
            batch_size,
            passes,
            model_samples=model_samples,
            seed=seed,
        )

        try:
            values = fisher_of("empirical")
        except fisher_mod.UnsupportedModel as err:
            return _skipped(out, meta, str(err))
        except fisher_mod.SampleDoesNotFit as err:
            # a failure, not a stored skip: with more memory or GPUs the same key must compute;
            # a ValueError, so not retried (the flow goes on without this Fisher)
            raise ValueError(f"{err}; {HELP}") from err
        if model_samples:
            try:  # the model's Fisher is evidence beside: its failure keeps the empirical one
                model_fisher = fisher_of("model")
                write_json(out / MODEL_SUMMARY, fisher_mod.fisher_summary(model_fisher))
            except (fisher_mod.UnsupportedModel, fisher_mod.SampleDoesNotFit) as err:
                meta["model_fisher_failed"] = str(err)
        if summary_only:
            write_json(out / SUMMARY, fisher_mod.fisher_summary(values))
        else:
            stored = {f"layer.{k}": v.to(STORED_DTYPE).contiguous() for k, v in values.items()}
            save_file(stored, out / FISHER)
        return {**meta, "samples_per_pass": passes.size, "oom_halvings": passes.halvings}

    return cached_stage(
        store,
        "fisher",
        {"checkpoint": checkpoint, "data": data_ref},
        {
            "probe_set": probe_set,
            "max_rows": max_rows,
            "layers": layers,
            "summary_only": summary_only,
            "model_samples": model_samples,
            "seed": seed if model_samples else None,  # the empirical Fisher draws nothing
        },
        code_version(fisher_mod, data, prompts),
        build,
    )
