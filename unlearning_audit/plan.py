"""How much accelerator memory each stage of an audit needs, and how much the store holds
afterwards, estimated from the configuration and the model's config.json, before any weight is
loaded (preflight refuses what cannot fit; ``unlearning-audit audit ... --plan`` prints it).

The model is built on the meta device (no memory) for its shapes: parameters, the linear
layers LoRA adapts, each layer's parameters (the Fisher's), hidden size, blocks, vocabulary.
Every figure is a sum of counted tensors, one function per concern, each saying what it counts:
what is alive at a stage's peak, without allocator slack, the CUDA context or library
workspaces. tests/test_plan.py holds them to within 30% of a peak measured on CPU, and
bench/bench_scale.py measures each stage (bench/results/cpu_scale.md).

Peaks are per device: with ``gpus`` > 1, training stages shard their weights and training
state across the GPUs (FSDP) and give each a share of the batch; inference stages split the
weights across them (device_map); the Fisher stage runs on one GPU.

Two memory settings are left to the stages, which choose them on the device they run on from
the functions here: gradient checkpointing under auto (use_checkpointing) and the Fisher's
samples per pass (fisher_pass); the plan chooses them as the stages will, for the budget, where
it sees what they see (the stage reads its own rows, and resolves precision on its machine).
They aim at AUTO_SHARE of it, as the estimates leave out what a GPU adds.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from .config import AuditParams, Checkpointing, RelearnConfig, UnlearnConfig

GIB = 2**30
DEVICE_MEMORY_ENV = "UNLEARNING_AUDIT_DEVICE_MEMORY"
DEFAULT_SEQUENCE = 512
"""Tokens per row assumed where the data cannot be rendered before the audit (a remote
original's tokenizer is not at hand): a prompt and a short answer."""
EVAL_BATCH = 64
"""Rows per forward pass of the evaluate stage (evaluation.score_rows)."""
EXTRACT_BATCH = 32
"""Rows per forward pass of the extract stage (activations.extract)."""
PROBE_SETS = 2
"""Probe sets whose activations are extracted (tasks.extract.PROBE_SETS: forget, retain)."""
RECORD_BYTES = 2**20
"""An allowance for each stage's small files (JSON logs, curves, per-fact scores)."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimates read of a model: its sizes, and its dtype's bytes per value."""

    parameters: int
    dtype_bytes: int
    hidden: int
    intermediate: int
    blocks: int
    vocab: int
    heads: int
    lora_dims: int
    """The sum of in + out features over the linear layers LoRA adapts ("all-linear": every
    one but the LM head); rank r adds r x lora_dims parameters."""
    largest_matrix: int
    """Elements of the largest weight matrix (a quantization's temporary copies are its)."""
    positions: int
    """The longest sequence the model takes (max_position_embeddings; 0 if it states none)."""
    layer_parameters: dict[int, int]
    """Parameters per layer (0 embeddings, i block i - 1, L + 1 final norm and head)."""
    checkpointing: bool
    """Whether the model's class supports gradient checkpointing (auto turns it on only then)."""


def shape_of(config) -> ModelShape:
    """The ModelShape of a transformers config, from the model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return model_shape(AutoModelForCausalLM.from_config(config))


def model_shape(model) -> ModelShape:
    """The ModelShape of a built model: one on the meta device (shape_of), or the one a stage
    loaded (which decides its memory settings from it: use_checkpointing, fisher_pass); its
    dtype is its config's."""
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from .metrics.weights import layer_parameters

    config = model.config
    head = model.get_output_embeddings()
    linear = [m for m in model.modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head]
    text = config.get_text_config(decoder=True)
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return ModelShape(
        parameters=sum(p.numel() for p in model.parameters()),
        dtype_bytes=dtype.itemsize,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        blocks=text.num_hidden_layers,
        vocab=text.vocab_size,
        heads=text.num_attention_heads,
        lora_dims=sum(sum(m.weight.shape) for m in linear),
        largest_matrix=max(p.numel() for p in model.parameters() if p.ndim == 2),
        positions=getattr(text, "max_position_embeddings", None) or 0,
        layer_parameters={
            layer: sum(p.numel() for _, p in params)
            for layer, params in layer_parameters(model).items()
        },
        checkpointing=bool(getattr(model, "supports_gradient_checkpointing", False)),
    )


def shape_of_folder(folder: Path, trust_remote_code: bool = False) -> ModelShape:
    """The ModelShape of a checkpoint folder's config.json (the folder has passed
    checkpoints.check_folder, which bounds what config.json may describe)."""
    from transformers import AutoConfig

    return shape_of(AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code))


def sequence_length(fmt, sets: dict[str, list[dict]]) -> int:
    """Tokens of the longest row of any set, rendered (prompt, answer and end of turn) as the
    training and evaluation stages render it: their batches are padded to it."""
    return max(
        len(e.prompt) + len(e.answer) + len(e.end)
        for rows in sets.values()
        if rows
        for e in fmt.encode(rows)
    )


def original_shape(params: AuditParams) -> tuple[ModelShape, Path | None]:
    """The original's ModelShape and its local folder (None for the embedded model, sized from
    params.embedded); a ValueError for a remote original (an s3:// or hub checkpoint), whose
    config.json is read once it is fetched, and for a folder check_folder refuses."""
    from . import checkpoints, embedded

    if params.original == checkpoints.EMBEDDED:
        return shape_of(embedded.model_config(params.embedded, params.embedded.vocab_size)), None
    spec = checkpoints.parse(params.original)
    if spec.kind != "local":
        raise ValueError(
            f"the plan reads the original's config.json from a local folder; {params.original!r} "
            "is fetched by the audit (fetch it, or give its local copy, to plan)"
        )
    folder = Path(spec.location)
    checkpoints.check_folder(folder, params.allow_pickle, params.trust_remote_code)
    return shape_of_folder(folder, params.trust_remote_code), folder


def audit_sequence(
    params: AuditParams, shape: ModelShape, folder: Path | None, sets: dict | None
) -> int:
    """Tokens per row the audit's stages pad to: the longest row of ``sets`` rendered by the
    local original's tokenizer in the audit's prompt format, else DEFAULT_SEQUENCE (at most
    the model's positions)."""
    if folder is None or sets is None:
        return min(DEFAULT_SEQUENCE, shape.positions or DEFAULT_SEQUENCE)
    from transformers import AutoTokenizer

    from . import prompts

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=params.trust_remote_code)
    fmt = prompts.renderer(tokenizer, params.data.prompt_format, params.data.separator)
    return sequence_length(fmt, sets)


def plan_audit(params: AuditParams, sets: dict[str, list[dict]] | None = None) -> Plan:
    """The plan of the audit ``params`` describes, without loading a weight: the original's
    shape (original_shape), rows rendered from ``sets`` (audit_sequence), the precision the
    training stages resolve to and the memory of the device they run on (device_budget)."""
    from . import runtime

    shape, folder = original_shape(params)
    seq = audit_sequence(params, shape, folder, sets)
    precision = runtime.resolve_precision(params.precision, params.device)
    estimate = plan(params, shape, seq, precision, device_budget(params.device))
    if not estimate.too_large():
        return estimate
    fitting = fitting_settings(params, shape, seq, precision, estimate.budget)
    return replace(estimate, fitting=tuple(fitting))


# -- memory per stage -----------------------------------------------------------------------


@dataclass(frozen=True)
class StageEstimate:
    """One stage's estimated peak on each device it runs on, and what makes it up (bytes)."""

    stage: str
    devices: int
    parts: dict[str, int]
    chosen: str = ""
    """The memory settings chosen for it where the audit left them to the stage (auto
    gradient checkpointing, the Fisher's samples per pass)."""

    @property
    def peak(self) -> int:
        return sum(self.parts.values())


def training_bytes(precision: str, dtype_bytes: int) -> int:
    """Bytes per trained parameter: its weight, gradient and AdamW's two moments, each in the
    dtype it trains in (training.weight_dtype: bf16 for pure bf16, else at least fp32, so 16 B
    in fp32 and bf16-mixed, 8 B in bf16), plus for bf16-mixed the bf16 copy autocast caches of
    each weight for the forward and backward passes (2 B)."""
    train = 2 if precision == "bf16" else max(dtype_bytes, 4)
    return 4 * train + (2 if precision == "bf16-mixed" else 0)


def activation_bytes(precision: str, dtype_bytes: int) -> int:
    """Bytes per saved activation value: bf16 under autocast or pure bf16, else the weights'
    training dtype (fp32, or fp64 for a float64 model)."""
    return 2 if precision in ("bf16", "bf16-mixed") else max(dtype_bytes, 4)


def block_activations(shape: ModelShape, tokens: int, value_bytes: int) -> int:
    """What one decoder block keeps for its backward pass, per token: about 12 hidden-size
    vectors (the two norms' inputs, fp32 copies and outputs, the query, key and value before and
    after the rotary embedding, the attention output, the residual) and 4 intermediate-size
    ones (the MLP's gate, up, activation and product). Fused attention (sdpa, flash) keeps no
    attention matrix."""
    return tokens * (12 * shape.hidden + 4 * shape.intermediate) * value_bytes


def attention_scores(shape: ModelShape, rows: int, seq: int, value_bytes: int) -> int:
    """The attention probabilities of one block under eager attention (the Fisher stage runs
    eager: torch.func has no batching rule for the fused kernels): rows x heads x seq^2,
    twice (the softmax and its input)."""
    return 2 * rows * shape.heads * seq * seq * value_bytes


def logits_bytes(shape: ModelShape, tokens: int, copies: int) -> int:
    """``copies`` fp32 tensors of a forward pass's logits over the vocabulary (the logits, the
    float copy, log-softmax, their gradients: the LM head's output dominates small batches)."""
    return copies * tokens * shape.vocab * 4


def forward_activations(
    shape: ModelShape, rows: int, seq: int, value_bytes: int, checkpointing: bool
) -> int:
    """A training forward pass's saved activations: every block's, or with gradient
    checkpointing each block's input plus one block recomputed at a time; and the logits
    (4 fp32 copies: logits, log-softmax, and both gradients in the backward pass)."""
    tokens = rows * seq
    if checkpointing:
        blocks = shape.blocks * tokens * shape.hidden * value_bytes
        blocks += block_activations(shape, tokens, value_bytes)
    else:
        blocks = shape.blocks * block_activations(shape, tokens, value_bytes)
    return blocks + logits_bytes(shape, tokens, 4)


def inference_activations(
    shape: ModelShape, rows: int, seq: int, value_bytes: int, logit_bytes: int
) -> int:
    """A no-grad forward pass's transient peak: one block's intermediates at a time (per token
    about 6 hidden-size vectors: residual, norm output, query, key, value, attention output; and
    3 intermediate-size ones: gate, up, their product) and the logits, ``logit_bytes`` per
    vocabulary entry (the model's dtype; evaluation adds fp32 log-softmax and float copies)."""
    tokens = rows * seq
    block = tokens * (6 * shape.hidden + 3 * shape.intermediate) * value_bytes
    return block + tokens * shape.vocab * logit_bytes


def evaluate_estimate(
    shape: ModelShape, seq: int, gpus: int = 1, bits: int | None = None
) -> StageEstimate:
    """The evaluate stage: the weights (split across ``gpus``) and a batch's forward pass; with
    ``bits``, RTN quantization first (fp32 temporaries of the largest matrix: its float copy,
    scaled and rounded values)."""
    parts = {
        "weights": shape.parameters * shape.dtype_bytes // gpus,
        "activations": inference_activations(
            shape, EVAL_BATCH, seq, shape.dtype_bytes, shape.dtype_bytes + 8
        ),
    }
    if bits is not None:
        parts["quantization"] = 3 * shape.largest_matrix * 4
    name = f"evaluate {bits}-bit" if bits else "evaluate"
    return StageEstimate(name, gpus, parts)


def extract_estimate(shape: ModelShape, seq: int, gpus: int = 1) -> StageEstimate:
    """The extract stage: the weights (split across ``gpus``) and a batch's forward pass over the
    prompts (the pooled per-layer outputs it keeps are small)."""
    return StageEstimate(
        "extract",
        gpus,
        {
            "weights": shape.parameters * shape.dtype_bytes // gpus,
            "activations": inference_activations(
                shape, EXTRACT_BATCH, seq, shape.dtype_bytes, shape.dtype_bytes
            ),
        },
    )


def splice_estimate(shape: ModelShape, seq: int, gpus: int = 1) -> StageEstimate:
    """The splice stage: the original's and the unlearned model's weights at once (each split
    across ``gpus``; one block's copy while two are swapped is left out) and an evaluate
    batch's forward pass."""
    evaluated = evaluate_estimate(shape, seq, gpus).parts
    return StageEstimate("splice", gpus, {**evaluated, "weights": 2 * evaluated["weights"]})


@dataclass(frozen=True)
class Compute:
    """How the training stages compute: precision (resolved), gradient checkpointing, GPUs."""

    precision: str = "fp32"
    checkpointing: bool = False
    gpus: int = 1


def train_estimate(
    shape: ModelShape,
    name: str,
    rows: int,
    seq: int,
    compute: Compute,
    lora_rank: int | None = None,
    reference: bool = False,
    forwards: int = 1,
    eval_rows: int = 0,
    accumulating: bool = False,
) -> StageEstimate:
    """A training stage's peak: the trained parameters' weights, AdamW moments and autocast
    copies (training_bytes less the gradient; with LoRA the frozen base in its dtype and the
    adapters, r x lora_dims parameters, trained), a frozen reference copy where the method needs
    one (none with LoRA: the base with its adapters disabled is the reference), and the largest
    of three moments: the backward pass, where the gradients fill in as the saved activations of
    ``forwards`` passes of ``rows`` rows (GD and KL add the retain batch's) are freed, so the
    larger of the two counts (both while ``accumulating`` micro-batches: the gradients of the
    earlier ones stay); and the no-grad evaluations of ``eval_rows`` rows between steps
    (relearning's curve, an early-stop check), after the gradients are freed. With several GPUs,
    weights and state are sharded across them and each takes a share of the rows."""
    gpus, precision = compute.gpus, compute.precision
    trained = lora_rank * shape.lora_dims if lora_rank else shape.parameters
    gradient = 2 if precision == "bf16" else max(shape.dtype_bytes, 4)
    state = trained * (training_bytes(precision, shape.dtype_bytes) - gradient) // gpus
    parts = {"weights": shape.parameters * shape.dtype_bytes // gpus} if lora_rank else {}
    parts["trained weights and optimizer state"] = state
    if reference and not lora_rank:
        parts["reference"] = shape.parameters * shape.dtype_bytes // gpus
    value_bytes = activation_bytes(precision, shape.dtype_bytes)
    share = math.ceil(rows / gpus)
    step = forwards * forward_activations(shape, share, seq, value_bytes, compute.checkpointing)
    gradients = trained * gradient // gpus
    backward = step + gradients if accumulating else max(step, gradients)
    check = inference_activations(
        shape, math.ceil(eval_rows / gpus), seq, value_bytes, value_bytes + 8
    )
    parts["gradients and activations"] = max(backward, check)
    return StageEstimate(name, gpus, parts)


def unlearn_estimate(
    shape: ModelShape, config: UnlearnConfig, seq: int, compute: Compute
) -> StageEstimate:
    """An unlearning run: forget and (GD, KL) retain batches of batch_size / micro_batches
    rows; NPO and KL compare against the frozen original; an early stop evaluates the forget
    set in batches of EVAL_BATCH rows."""
    from .unlearning import needs_reference

    return train_estimate(
        shape,
        f"unlearn {config.label}",
        math.ceil(config.batch_size / config.micro_batches),
        seq,
        compute,
        config.lora_rank,
        reference=needs_reference(config),
        forwards=2 if "+" in config.method else 1,
        eval_rows=0 if config.stop_at_forget_em is None else EVAL_BATCH,
        accumulating=config.micro_batches > 1,
    )


def relearn_estimate(
    shape: ModelShape,
    config: RelearnConfig,
    seq: int,
    compute: Compute,
    name: str = "relearn",
    eval_rows: int = EVAL_BATCH,
) -> StageEstimate:
    """A relearning run: one batch of batch_size / micro_batches rows per forward pass, and
    its recovery curve's evaluations (batches of at most EVAL_BATCH rows)."""
    rows = math.ceil(config.batch_size / config.micro_batches)
    return train_estimate(
        shape,
        name,
        rows,
        seq,
        compute,
        config.lora_rank,
        eval_rows=eval_rows,
        accumulating=config.micro_batches > 1,
    )


def fisher_parameters(shape: ModelShape, layers: list[int] | None) -> int:
    """Parameters of the Fisher's chosen layers (all for None)."""
    chosen = shape.layer_parameters if layers is None else layers
    return sum(shape.layer_parameters.get(layer, 0) for layer in chosen)


AUTO_SHARE = 0.9
"""The share of a device's memory the settings left to the stages aim at: the estimates leave
out the CUDA context, library workspaces and allocator slack (a few GiB on a GPU), and are held
to within 30% of measured peaks, so a stage estimated at 98% of its device is left some room."""


def auto_budget(budget: int) -> int:
    """The memory the settings left to the stages aim at on a device of ``budget`` bytes."""
    return int(budget * AUTO_SHARE)


def fisher_pass(
    shape: ModelShape,
    most: int,
    layers: list[int] | None,
    seq: int,
    budget: int | None,
) -> int:
    """Samples per per-sample-gradient pass the Fisher stage starts at: the most, up to
    ``most``, whose estimate (fisher_estimate) fits auto_budget(``budget``); ``most`` without a
    budget, and 1 where no size fits (one sample that does not fit fails as
    fisher.SampleDoesNotFit)."""
    if budget is None:
        return most
    aim = auto_budget(budget)
    fitting = (n for n in range(most, 1, -1) if fisher_estimate(shape, n, layers, seq).peak <= aim)
    return next(fitting, 1)


def fisher_estimate(
    shape: ModelShape, batch_size: int, layers: list[int] | None, seq: int
) -> StageEstimate:
    """The Fisher stage (metrics.fisher): the weights, ``batch_size`` per-sample gradients of
    the chosen layers in the weights' dtype, their fp32 running sums of squares, and the
    per-sample forward and backward passes under eager attention, counted twice: vmap's
    per-sample backward held about twice a batched pass's activations in measurements on CPU
    (bench/results/cpu_scale.md). On one GPU whatever ``gpus`` the audit gives the other
    stages: the stage loads the whole model on one device (docs/scale.md)."""
    chosen = fisher_parameters(shape, layers)
    value_bytes = shape.dtype_bytes
    tokens = batch_size * seq
    activations = (
        2
        * shape.blocks
        * (
            block_activations(shape, tokens, value_bytes)
            + attention_scores(shape, batch_size, seq, value_bytes)
        )
    )
    return StageEstimate(
        "fisher",
        1,
        {
            "weights": shape.parameters * shape.dtype_bytes,
            "per-sample gradients": batch_size * chosen * shape.dtype_bytes,
            "sums": chosen * max(shape.dtype_bytes, 4),
            "activations": activations + logits_bytes(shape, tokens, 3),
        },
    )


def use_checkpointing(
    setting: Checkpointing,
    shape: ModelShape,
    budget: int | None,
    estimate: Callable[[bool], StageEstimate],
) -> bool:
    """Whether a training stage checkpoints its activations: as ``setting`` says where it is a
    bool; under "auto", exactly where its peak without (``estimate(False)``) exceeds
    auto_budget(``budget``), the model supports it, and it lowers the peak (where the gradients
    outweigh the activations it saves nothing, for a third more compute): off where the stage
    fits, or the budget is unknown (None). The plan decides with it, and so does the stage on
    the device it runs on."""
    if setting != "auto":
        return setting
    if budget is None or not shape.checkpointing:
        return False
    off = estimate(False).peak
    return off > auto_budget(budget) and estimate(True).peak < off


def checkpointed(
    setting: Checkpointing,
    shape: ModelShape,
    budget: int | None,
    estimate: Callable[[bool], StageEstimate],
) -> StageEstimate:
    """A training stage's estimate with or without checkpointing, as use_checkpointing
    decides; under "auto" the choice is recorded (StageEstimate.chosen)."""
    on = use_checkpointing(setting, shape, budget, estimate)
    ran = estimate(on)
    if setting != "auto":
        return ran
    return replace(ran, chosen=f"checkpointing {'on' if on else 'off'} (auto)")


def stage_estimates(
    params: AuditParams, shape: ModelShape, seq: int, precision: str, budget: int | None = None
) -> list[StageEstimate]:
    """Every accelerator stage of the audit ``params`` describes (fetching needs none), with
    the training stages in ``precision`` (resolved); one row per unlearning method. Settings
    left to the stages (auto gradient checkpointing, the Fisher's samples per pass) are chosen
    as the stages choose them on a device of ``budget`` bytes."""
    gpus = params.gpus

    def training(estimate: Callable[[Compute], StageEstimate]) -> StageEstimate:
        return checkpointed(
            params.gradient_checkpointing,
            shape,
            budget,
            lambda on: estimate(Compute(precision, on, gpus)),
        )

    stages = [evaluate_estimate(shape, seq, gpus), extract_estimate(shape, seq, gpus)]
    if params.unlearned is None:
        stages += [training(partial(unlearn_estimate, shape, m, seq)) for m in params.methods]
    stages.append(training(partial(relearn_estimate, shape, params.relearn, seq)))
    if has_control(params):
        control = partial(relearn_estimate, shape, params.relearn, seq, name="control relearn")
        stages.append(training(control))
    if params.fisher:
        layers = params.fisher_layers
        size = fisher_pass(shape, params.fisher_batch_size, layers, seq, budget)
        fisher = fisher_estimate(shape, size, layers, seq)
        stages.append(replace(fisher, chosen=f"{size} samples per pass"))
    stages += [evaluate_estimate(shape, seq, gpus, bits) for bits in params.quantization_bits]
    if params.splice:
        stages.append(splice_estimate(shape, seq, gpus))
    return stages


def has_control(params: AuditParams) -> bool:
    """Whether the audit relearns a never-learned control (given, or the embedded one's)."""
    return not params.no_control and (params.control is not None or params.original == "embedded")


# -- the store ------------------------------------------------------------------------------


def store_estimate(params: AuditParams, shape: ModelShape) -> dict[str, int]:
    """What the audit writes to the store (bytes), by kind: the fetched original and control,
    one checkpoint per unlearned model (or the given one; a LoRA run's adapter alone, r x
    lora_dims float32 values), the relearned checkpoints only with keep_relearned (one per
    unlearned model; with LoRA relearning, an adapter), the Fisher of the original in bf16 (2 B
    per parameter of the chosen layers) and each unlearned model's as its summary, the
    activations of every extracted model (the original, each unlearned and relearned one: rows
    of the probe sets x layers x hidden size x 4 B), and a small allowance per stage for its
    JSON files."""
    checkpoint = shape.parameters * shape.dtype_bytes

    def trained(lora_rank: int | None) -> int:
        return lora_rank * shape.lora_dims * 4 if lora_rank else checkpoint

    methods = [] if params.unlearned is not None else params.methods
    unlearned = 1 if params.unlearned is not None else len(params.methods)
    given = checkpoint if params.unlearned is not None else 0
    relearn_runs = len(params.relearn_sources) * params.relearn.seeds
    layers = len(params.layers) if params.layers else shape.blocks + 1
    rows = PROBE_SETS * params.data.eval_max_rows
    stages = 4 + unlearned * (6 + relearn_runs + len(params.quantization_bits))
    return {
        "original": checkpoint,
        "control": checkpoint if has_control(params) else 0,
        "unlearned": given + sum(trained(m.lora_rank) for m in methods),
        "relearned": unlearned * trained(params.relearn.lora_rank) if params.keep_relearned else 0,
        "fisher": fisher_parameters(shape, params.fisher_layers) * 2 + unlearned * RECORD_BYTES
        if params.fisher
        else 0,
        "activations": (1 + 2 * unlearned) * rows * layers * shape.hidden * 4,
        "records": (stages + relearn_runs * has_control(params)) * RECORD_BYTES,
    }


# -- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """An audit's estimated peak per stage, the device memory they are held to (None: not
    enforced), and its store footprint."""

    stages: list[StageEstimate]
    store: dict[str, int]
    budget: int | None
    precision: str
    sequence: int
    parameters: int
    fitting: tuple[str, ...] = ()
    """Settings under which every stage would fit the budget, where some stage does not."""

    def too_large(self) -> list[StageEstimate]:
        """The stages whose peak exceeds the device budget."""
        if self.budget is None:
            return []
        return [s for s in self.stages if s.peak > self.budget]

    def table(self) -> str:
        """The plan as a text table: each stage's peak per device, whether it fits the budget
        and the memory settings chosen for it, then the store's footprint, and the settings
        that would fit where a stage does not."""
        held = f"{_size(self.budget)} per device" if self.budget else "not enforced (no GPU)"
        size = (
            f"{self.parameters / 1e9:.2f}B"
            if self.parameters >= 1e9
            else (f"{self.parameters / 1e6:.1f}M")
        )
        width = max(len(s.stage) for s in self.stages)
        lines = [
            f"model: {size} parameters; training in {self.precision}; {self.sequence} tokens "
            f"per row; device memory: {held}",
            f"{'stage':<{width}}  {'GPUs':>4}  {'peak/device':>11}  fits  chosen",
        ]
        for s in self.stages:
            fits = "-" if self.budget is None else ("yes" if s.peak <= self.budget else "NO")
            row = f"{s.stage:<{width}}  {s.devices:>4}  {_size(s.peak):>11}  {fits:<4}  {s.chosen}"
            lines.append(row.rstrip())
        kinds = ", ".join(f"{k} {_size(v)}" for k, v in self.store.items() if v)
        lines.append(f"store: {_size(sum(self.store.values()))} ({kinds})")
        if self.too_large():
            lines.append(f"settings that would fit: {self._fits()}")
        return "\n".join(lines)

    def _fits(self) -> str:
        """The settings that would fit, or what was tried."""
        return "; ".join(self.fitting) or (
            "none of --lora 16, --gradient-checkpointing, micro-batches of one row, "
            "--no-splice, --no-fisher, --precision bf16, --gpus up to 8, or their lossless "
            "one-GPU combinations (the Fisher's passes are of one sample already where larger "
            "ones do not fit; --fisher-layers computes fewer layers)"
        )

    def problems(self) -> list[str]:
        """A line per stage that does not fit the budget, naming the settings that would."""
        return [
            f"memory: {s.stage} needs about {_size(s.peak)} per device, more than the "
            f"{_size(self.budget)} a device has; settings that would fit: {self._fits()}"
            for s in self.too_large()
        ]


def plan(
    params: AuditParams,
    shape: ModelShape,
    seq: int,
    precision: str,
    budget: int | None,
) -> Plan:
    """The estimate of the audit ``params`` describes for a model of ``shape`` and rows of
    ``seq`` tokens, training in ``precision`` (resolved), held to ``budget`` bytes per device
    (which the settings left to the stages are chosen for: stage_estimates)."""
    return Plan(
        stage_estimates(params, shape, seq, precision, budget),
        store_estimate(params, shape),
        budget,
        precision,
        seq,
        shape.parameters,
    )


def fitting_settings(
    params: AuditParams,
    shape: ModelShape,
    seq: int,
    precision: str,
    budget: int,
    stage: str = "",
) -> list[str]:
    """The settings (flags) under which every stage (or every stage whose name starts with
    ``stage``) fits ``budget``, found by estimating the audit again: each of SETTINGS alone
    that fits, else the smallest combination of the lossless one-GPU settings that fits (the
    first in SETTINGS' order among the smallest), else the fewest GPUs with such a
    combination; empty if nothing does."""

    def fits(audit: AuditParams, resolved: str) -> bool:
        over = plan(audit, shape, seq, resolved, budget).too_large()
        return not [s for s in over if s.stage.startswith(stage)]

    found = [flag for flag, change, lossy in SETTINGS if fits(change(params), lossy or precision)]
    gpus = [(f, c) for f, c, _ in SETTINGS if f.startswith("--gpus")]
    lossless = [(f, c) for f, c, lossy in SETTINGS if not lossy and (f, c) not in gpus]
    if any(flag in found for flag, _ in lossless):
        return found
    for more in [[], *([g] for g in gpus)]:
        for size in range(1 if more else 2, len(lossless) + 1):
            for combination in itertools.combinations(lossless, size):
                combined = params
                for _, change in (*more, *combination):
                    combined = change(combined)
                if fits(combined, precision):
                    return [*found, " ".join(flag for flag, _ in (*more, *combination))]
    return found


def stage_note(
    stage: str,
    config: dict,
    batch,
    shape: ModelShape,
    seq: int,
    budget: int | None,
    requested=None,
) -> str:
    """The estimate of one stage run (its stage name, the config it is stored under and its
    training config ``batch``, if any) and, against ``budget``, the settings under which it
    would fit; for an out-of-memory error. The config's precision, gradient_checkpointing,
    gpus, batch_size and layers are read where it holds them (defaults otherwise); auto
    checkpointing is resolved as the stage resolved it, from its ``requested`` training config
    (``batch`` may be it split into more micro-batches)."""
    precision = config.get("precision", "fp32")
    config = _checkpointing_as_decided(stage, config, requested, shape, seq, budget, precision)
    params = _stage_audit(stage, config, batch)
    estimate = plan(params, shape, seq, precision, budget)
    ran = next(s for s in estimate.stages if s.stage.startswith(stage))
    parts = ", ".join(f"{k} {_size(v)}" for k, v in ran.parts.items())
    note = f"estimated peak {_size(ran.peak)} per device ({parts}; {seq} tokens per row)"
    if budget is None:
        return note
    fitting = fitting_settings(params, shape, seq, precision, budget, stage)
    return f"{note}; device memory {_size(budget)}; settings that would fit: " + (
        "; ".join(fitting) or "none tried alone or combined"
    )


def _checkpointing_as_decided(
    stage: str,
    config: dict,
    requested,
    shape: ModelShape,
    seq: int,
    budget: int | None,
    precision: str,
) -> dict:
    """``config`` with auto gradient checkpointing replaced by what a training stage decided
    from its ``requested`` config (use_checkpointing, as tasks._stage.checkpointing_here)."""
    estimates = {"unlearn": unlearn_estimate, "relearn": relearn_estimate}
    auto = config.get("gradient_checkpointing", "auto") == "auto"
    if not auto or stage not in estimates or requested is None:
        return config

    def ran(on: bool) -> StageEstimate:
        compute = Compute(precision, on, config.get("gpus", 1))
        return estimates[stage](shape, requested, seq, compute)

    return {**config, "gradient_checkpointing": use_checkpointing("auto", shape, budget, ran)}


def _stage_audit(stage: str, config: dict, batch) -> AuditParams:
    """An audit whose ``stage`` runs as the stored ``config`` and ``batch`` describe."""
    common = {key: config[key] for key in ("gradient_checkpointing", "gpus") if key in config}
    if stage == "unlearn":
        return AuditParams(methods=[batch], **common)
    if stage == "relearn":
        return AuditParams(relearn=batch, **common)
    if stage == "fisher":
        return AuditParams(
            fisher_batch_size=config.get("batch_size", 16),
            fisher_layers=config.get("layers"),
            **common,
        )
    return AuditParams(**common)


def with_lora(params: AuditParams) -> AuditParams:
    """Every unlearning and relearning run trains a LoRA adapter of rank 16 (--lora 16)."""
    lora = {"lora_rank": 16}
    return params.model_copy(
        update={
            "methods": [m.model_copy(update=lora) for m in params.methods],
            "relearn": params.relearn.model_copy(update=lora),
        }
    )


def _one_row(params: AuditParams) -> AuditParams:
    """Every training run splits its batch into micro-batches of one row."""
    return params.model_copy(
        update={
            "methods": [
                m.model_copy(update={"micro_batches": m.batch_size}) for m in params.methods
            ],
            "relearn": params.relearn.model_copy(
                update={"micro_batches": params.relearn.batch_size}
            ),
        }
    )


def _setting(**update) -> Callable[[AuditParams], AuditParams]:
    """The audit with ``update`` applied to its fields."""
    return lambda params: params.model_copy(update=update)


SETTINGS: list[tuple[str, Callable[[AuditParams], AuditParams], str | None]] = [
    ("--lora 16", with_lora, None),
    ("--gradient-checkpointing", _setting(gradient_checkpointing=True), None),
    ("micro_batches = batch_size (methods, relearn)", _one_row, None),
    ("--no-splice", _setting(splice=False), None),
    ("--no-fisher", _setting(fisher=False), None),
    ("--precision bf16 (lossy)", _setting(), "bf16"),
    *((f"--gpus {n}", _setting(gpus=n), None) for n in (2, 4, 8)),
]
"""Settings that save memory, tried in this order: (flag, the audit changed by it, the
precision it forces: pure bf16, lossy, is never combined with others). The Fisher's pass size
is none of them: the stage sizes its passes to the device (fisher_pass); and
--gradient-checkpointing helps only an audit that turned it off, auto turning it on wherever a
stage needs it."""


# -- device memory --------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes of a size such as 80GiB, 141GB, 512MiB or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"{DEVICE_MEMORY_ENV}: {text!r} is not a size such as 80GiB or 141GB")
    number, unit = float(match[1]), (match[2] or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    return int(number * scale)


def device_budget(device: str) -> int | None:
    """The memory one device of the kind ``device`` names has: $UNLEARNING_AUDIT_DEVICE_MEMORY
    where set (a size, e.g. 80GiB: plan for a device this machine lacks, and tests), else a
    CUDA GPU's total memory. None on a CPU or MPS device: their memory is the machine's, shared
    with everything else on it and backed by swap, so a CPU audit is planned but never refused
    (a stage that does not fit there fails with the operating system's out-of-memory error)."""
    from . import runtime

    if os.environ.get(DEVICE_MEMORY_ENV):
        return parse_size(os.environ[DEVICE_MEMORY_ENV])
    resolved = runtime.resolve_device(device)
    if resolved.type != "cuda":
        return None
    import torch

    return torch.cuda.get_device_properties(resolved).total_memory


def _size(value: int | None) -> str:
    """Bytes in GiB (or MiB below one GiB)."""
    if value is None:
        return "-"
    return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / 2**20:.1f} MiB"
