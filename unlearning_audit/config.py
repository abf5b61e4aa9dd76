"""Typed configuration for every stage, validated at the edge (CLI, flow parameters).

Defaults work on the embedded model; DEFAULTS_7B in the README lists settings for 7B-class models.
Every model here is JSON-serialisable, so it can be a Prefect parameter and part of a cache key.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from .prompts import check_format
from .store import check_key, check_url

METHODS = ("GA", "GA+GD", "GA+KL", "NPO", "NPO+KL", "RLabel")
Domain = Literal["text", "code", "math"]
RelearnSource = Literal["forget", "forget-half", "retain", "unrelated"]
RequestSplit = Literal["disjoint", "repeat"]
Precision = Literal["auto", "fp32", "bf16-mixed", "bf16"]
Checkpointing = bool | Literal["auto"]
"""Gradient checkpointing in the training stages: on, off, or auto (on where the stage's peak
without it exceeds 90% of its device and checkpointing lowers it: plan.use_checkpointing)."""


Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""A positive, finite number (a learning rate, a budget): infinity would train to NaN weights."""
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
"""A seed every generator accepts (numpy's are 32-bit)."""
Steps = Annotated[int, Field(gt=0, le=1_000_000)]
DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def _known_device(value: str) -> str:
    if not DEVICE.fullmatch(value):
        raise ValueError(f"unknown device {value!r}; give auto, cpu, mps, cuda or cuda:N")
    return value


Device = Annotated[
    str,
    AfterValidator(_known_device),
    # the pattern and examples are the run form's: it refuses an unknown device before a run
    # starts, and offers the usual ones
    WithJsonSchema(
        {
            "type": "string",
            "pattern": f"^({DEVICE.pattern})$",
            "examples": ["auto", "cpu", "cuda", "cuda:0", "mps"],
        }
    ),
]
"""A device torch knows: auto, cpu, mps, cuda or cuda:N."""


def _canonical_method(value: object) -> object:
    """A method name as METHODS spells it, whatever its case, with _ for + (``npo_kl``)."""
    if not isinstance(value, str):
        return value
    names = {m.lower(): m for m in METHODS}
    canonical = names.get(value.strip().lower().replace("_", "+"))
    if canonical is None:
        raise ValueError(f"unknown method {value!r}; known methods: {', '.join(METHODS)}")
    return canonical


Method = Annotated[Literal[METHODS], BeforeValidator(_canonical_method)]
"""An unlearning method: a choice in the run form, read in any case (``npo+kl``, ``NPO_KL``)."""


def _no_credentials(value: str, info: ValidationInfo) -> str:
    return check_url(value, info.field_name or "URL")


Location = Annotated[str, AfterValidator(_no_credentials)]
"""A checkpoint, data source or store: a path or a URL, never one holding credentials (they
would be kept in Prefect's database and logs)."""


class _Config(BaseModel):
    # inputs are never echoed in validation errors (Prefect logs them): one could be a secret
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class EmbeddedConfig(_Config):
    """The built-in default: a synthetic corpus and a tiny Llama pretrained on it on CPU."""

    seed: Seed = Field(0, description="Seed of the corpus, the tokenizer and the model.")
    authors: PositiveInt = Field(200, description="Fictitious authors (text domain), 5 facts each.")
    functions: PositiveInt = Field(24, description="Functions (code domain), 5 facts each.")
    operands: PositiveInt = Field(24, description="Left operands (math domain), 5 sums each.")
    forget_fraction: float = Field(0.2, gt=0, lt=1, description="Share of each domain to forget.")
    vocab_size: PositiveInt = Field(1024, description="BPE vocabulary size.")
    hidden_size: PositiveInt = Field(128, description="Width of the residual stream.")
    intermediate_size: PositiveInt = Field(352, description="Width of each block's MLP.")
    layers: PositiveInt = Field(4, description="Decoder blocks.")
    heads: PositiveInt = Field(4, description="Attention heads per block.")
    lr: Rate = Field(2e-3, description="Pretraining learning rate.")
    warmup: int = Field(50, ge=0, description="Pretraining warm-up steps.")
    batch_size: PositiveInt = Field(64, description="Pretraining rows per step.")
    max_steps: Steps = Field(2000, description="Give up (error) past this many steps.")
    eval_every: PositiveInt = Field(50, description="Steps between checks of the targets.")
    target_exact_match: float = Field(0.85, ge=0, le=1, description="Stop once forget EM >= it.")
    target_token_accuracy: float = Field(0.9, ge=0, le=1, description="... and token acc >= it.")


TofuSplit = Literal["forget01", "forget05", "forget10"]
TOFU_GROUP = "position:20"
"""TOFU orders its rows by author, 20 questions each: every 20 consecutive rows are one author."""


def tofu_sources(root: str, split: TofuSplit) -> dict[str, str]:
    """The forget and retain sources of a TOFU split: ``root`` is a local folder holding TOFU's
    files (forget10.json, retain90.json, ...) or the hub dataset ``locuslab/TOFU@<revision>``."""
    retain = f"retain{100 - int(split.removeprefix('forget')):02d}"
    if "@" in root and not root.startswith((".", "/", "~")):
        name, _, revision = root.partition("@")
        return {
            k: f"{name}:{v}@{revision}#train" for k, v in (("forget", split), ("retain", retain))
        }
    folder = root.rstrip("/")
    return {"forget": f"{folder}/{split}.json", "retain": f"{folder}/{retain}.json"}


class DataConfig(_Config):
    """Which facts to forget, keep and use as unrelated probes, and how a model sees them."""

    domain: Domain = Field("text", description="Embedded corpus: the domain to forget from.")
    forget: Location | None = Field(
        None,
        description="External forget set: a local JSON/JSONL/Parquet file or a `datasets` "
        "source `name[:config][@revision]#split` with question/answer columns.",
    )
    retain: Location | None = Field(None, description="External retain set, same forms as forget.")
    unrelated: Location | None = Field(None, description="External unrelated set (optional).")
    tofu: Location | None = Field(
        None,
        description="TOFU preset: a local folder with TOFU's files, or locuslab/TOFU@<revision>; "
        "sets forget, retain (the split's) and group (authors: every 20 rows).",
    )
    tofu_split: TofuSplit = Field("forget10", description="TOFU's forget split (with tofu).")
    question_column: str = Field("question", description="The rows' question field.")
    answer_column: str = Field("answer", description="The rows' answer field.")
    group: str | None = Field(
        None,
        description="External data: the column grouping facts (an author, a topic), or "
        "position:N (every N consecutive rows). The held-out half needs groups; without them "
        "it is reported unavailable.",
    )
    prompt_format: str = Field(
        "auto",
        description="chat (the tokenizer's chat template), raw (question, separator, answer), "
        "or a template with {question} and {answer}; auto: chat where the tokenizer has a "
        "chat template, else 'Q: {question}\\nA: {answer}'.",
    )
    separator: str = Field("\n", description="Between question and answer in the raw format.")
    max_new_tokens: PositiveInt = Field(
        64, description="Cap on generated tokens for ROUGE-L (greedy generations)."
    )
    eval_max_rows: PositiveInt = Field(
        200, description="Evaluate on at most this many rows per set (seeded sample)."
    )

    @model_validator(mode="before")
    @classmethod
    def _tofu_preset(cls, values):
        """Fill forget, retain and group from the TOFU preset; refuse other sources beside it."""
        if not isinstance(values, dict) or not values.get("tofu"):
            return values
        sources = tofu_sources(values["tofu"], values.get("tofu_split", "forget10"))
        clash = [k for k, v in sources.items() if values.get(k) not in (None, v)]
        if clash:
            raise ValueError(f"tofu sets {clash} itself; give either tofu or {clash}")
        return {**values, **sources, "group": values.get("group") or TOFU_GROUP}

    @field_validator("prompt_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        return check_format(value)

    @property
    def external(self) -> bool:
        """Whether the facts are the user's (not the embedded corpus)."""
        return self.forget is not None

    @property
    def has_groups(self) -> bool:
        """Whether facts are grouped, so the held-out half can hold out whole groups."""
        return not self.external or self.group is not None


LR = (
    "Learning rate (AdamW); none: 1e-3 on the embedded model, else scaled to the model's size "
    "(training.default_lr: 1e-5 at 7B parameters, TOFU's rate)."
)
EMBEDDED_LR = 1e-3
"""The embedded model's training rate, its unlearning and relearning default."""

MicroBatches = Annotated[
    PositiveInt,
    Field(description="Split each step's batch into this many parts (gradient accumulation)."),
]


class _Batched(_Config):
    """A training config: rows per step, optionally accumulated over micro-batches."""

    @model_validator(mode="after")
    def _parts_fit_the_batch(self) -> _Batched:
        if self.micro_batches > self.batch_size:
            raise ValueError(
                f"micro_batches ({self.micro_batches}) cannot exceed batch_size "
                f"({self.batch_size}): each micro-batch needs at least one row"
            )
        return self


class UnlearnConfig(_Batched):
    """One unlearning run: a method and its hyperparameters."""

    method: Method = Field("GA", description="The unlearning method (DESIGN.md).")
    lr: Rate | None = Field(None, description=LR)
    steps: Steps = Field(60, description="Optimiser steps (upper bound with early stop).")
    batch_size: PositiveInt = Field(16, description="Forget (and retain) rows per step.")
    micro_batches: MicroBatches = 1
    beta: Rate = Field(0.1, description="NPO inverse temperature.")
    retain_weight: Weight = Field(1.0, description="Weight of the retain term (GD, KL).")
    stop_at_forget_em: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Early stop at collapse: stop once the forget score falls below this "
        "(exact match; answer-token accuracy for long answers).",
    )
    check_every: PositiveInt = Field(5, description="Steps between early-stop checks.")
    lora_rank: int | None = Field(None, gt=0, description="Train a LoRA adapter (peft) instead.")
    head_only: bool = Field(
        False,
        description="Train the LM head alone, the body frozen: a shallow edit that hides the "
        "answers and keeps the knowledge (the known-reversible calibration audit).",
    )
    requests: PositiveInt = Field(
        1,
        description="Unlearn in this many successive requests, each from the model the "
        "previous one left, each running the method for up to `steps` steps (steps are per "
        "request) with early stop on its own rows.",
    )
    request_split: Literal["disjoint", "repeat"] = Field(
        "disjoint",
        description="What each request unlearns: disjoint, the forget set cut in order into "
        "`requests` parts, one per request; repeat, the whole forget set every time.",
    )

    @property
    def label(self) -> str:
        """Short name for tables: method, learning rate, steps, early stop and requests."""
        stop = "" if self.stop_at_forget_em is None else f" stop<{self.stop_at_forget_em:g}"
        weight = f" w={self.retain_weight:g}" if "+" in self.method else ""
        head = " head-only" if self.head_only else ""
        lr = "auto" if self.lr is None else f"{self.lr:g}"
        requests = f" x{self.requests} {self.request_split}" if self.requests > 1 else ""
        return f"{self.method} lr={lr} steps={self.steps}{weight}{stop}{head}{requests}"

    @model_validator(mode="after")
    def _one_way_to_train(self) -> UnlearnConfig:
        if self.head_only and self.lora_rank:
            raise ValueError("head_only and lora_rank cannot be combined: choose one")
        return self


class RelearnConfig(_Batched):
    """The relearning attack: a small fine-tuning budget on one data source."""

    sources: list[RelearnSource] = Field(
        ["forget", "forget-half"],
        description="forget: the whole forget set; forget-half: one half, evaluated on the "
        "other; retain: same-domain retain data; unrelated: other-domain data.",
        min_length=1,
    )
    budget: Rate = Field(
        1.0, le=100, description="Examples seen, as a multiple of |forget| (at most 100)."
    )

    @field_validator("sources")
    @classmethod
    def _forget_first(cls, value: list[str]) -> list[str]:
        if "forget" not in value:
            raise ValueError("sources must include 'forget': the verdict rests on it")
        return list(dict.fromkeys(value))

    lr: Rate | None = Field(None, description=LR)
    batch_size: PositiveInt = Field(8, description="Rows per relearning step.")
    micro_batches: MicroBatches = 1
    lora_rank: int | None = Field(
        None,
        gt=0,
        description="Relearn (the candidate and the control alike) by training a LoRA adapter "
        "of this rank (peft) instead of every weight: far less memory for large models.",
    )
    seeds: int = Field(
        3,
        ge=1,
        le=20,
        description="Relearning runs per source, each with its own data order (the candidate "
        "and the control share them); the verdict averages each fact over them.",
    )


Metric = Literal["auto", "exact_match", "token_accuracy", "probability", "rouge_l"]
METRIC_NAMES = {
    "exact_match": "exact match",
    "token_accuracy": "answer-token accuracy",
    "probability": "answer probability",
    "rouge_l": "ROUGE-L recall",
}
"""Each per-fact score's name in reports."""


class Thresholds(_Config):
    """The verdict's metric, thresholds and statistics (DESIGN.md, "Verdict"); every report
    states them."""

    metric: Metric = Field(
        "auto",
        description="Per-fact score the verdict tests: exact_match (short answers), or a graded "
        "score: token_accuracy, probability (length-normalised answer probability), rouge_l "
        "(ROUGE-L recall of greedy generations). auto: exact_match where the forget set's "
        "answers are short (median at most 4 words), else token_accuracy.",
    )
    known: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Refuse the audit, before any training, when the original scores below "
        "this on the forget set in the metric: a wrong prompt format or metric, or a model "
        "that never knew the facts.",
    )
    forgotten: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Forgotten if at least this share of the original's forget "
        "score is lost (and the paired drop is significant).",
    )
    catastrophic: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Catastrophic if the retain score drops by more than this "
        "share (and the paired drop is significant).",
    )
    control_margin: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Reversible if the lower bound on the mean advantage over the never-learned "
        "control (gain minus the control's gain, per fact) lies above this, on the forget set "
        "or the held-out half (Holm over the two).",
    )
    equivalence_margin: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Irreversible if the upper bound on the mean advantage lies below this on "
        "every look: no faster recovery than a model that never learned the facts.",
    )
    capacity: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Cannot relearn if, on the rows it is relearned on, the candidate reaches "
        "less than this share of the control's score (significantly).",
    )
    alpha: float = Field(
        0.05, gt=0, lt=0.5, description="One-sided error rate of every bound and test."
    )
    resamples: int = Field(
        10_000, ge=100, le=1_000_000, description="Cluster-bootstrap resamples (over groups)."
    )


# The demo's settings, picked from runs on the embedded model (README, "Results") to show the
# regimes: ascent stopped at collapse (reversible, catastrophic), KL-anchored NPO (reversible,
# retain kept), ascent run on past collapse (the model no longer learns: cannot relearn).
DEFAULT_METHODS = [
    UnlearnConfig(method="GA", lr=1e-3, steps=60, stop_at_forget_em=0.1, check_every=2),
    UnlearnConfig(method="NPO+KL", lr=3e-4, steps=100, retain_weight=3.0),
    UnlearnConfig(method="GA", lr=1e-3, steps=150),
]


class AuditParams(_Config):
    """Everything one audit needs; every field has a working default (the embedded model)."""

    original: Location = Field(
        "embedded",
        description="The original checkpoint: `embedded`, a local folder, an "
        "s3:// prefix, or a hub id pinned to a revision (org/name@revision).",
    )
    unlearned: Location | None = Field(
        None,
        description="An already-unlearned checkpoint to audit against the original "
        "(same forms); when set, no unlearning method runs.",
    )
    control: Location | None = Field(
        None,
        description="A never-learned control checkpoint (same forms). With the embedded "
        "original, one is built without the forget facts unless `no_control` is set.",
    )
    no_control: bool = Field(False, description="Skip the never-learned control.")
    methods: list[UnlearnConfig] = Field(
        default_factory=lambda: list(DEFAULT_METHODS), description="Unlearning runs."
    )
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="The facts: forget, retain and unrelated sets, and their prompt format.",
    )
    relearn: RelearnConfig = Field(
        default_factory=RelearnConfig, description="The relearning attack."
    )
    thresholds: Thresholds = Field(
        default_factory=Thresholds, description="The verdict's metric, thresholds and statistics."
    )
    embedded: EmbeddedConfig = Field(
        default_factory=EmbeddedConfig,
        description="The built-in tiny model (used when original is `embedded`).",
    )
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        min_length=1,
        description="Activation layers (0: the embeddings, i: block i's output); default all.",
    )
    fisher: bool = Field(True, description="Compute the diagonal Fisher (a GPU stage).")
    probes: bool = Field(True, description="Linear probes per layer as a recovery attack.")
    splice: bool = Field(
        True,
        description="The causal layer test: score the original with the unlearned model's top "
        "k blocks and head, and the reverse, for each k (a GPU stage holding both models).",
    )
    splice_depths: list[Annotated[int, Field(ge=1)]] | None = Field(
        None,
        min_length=1,
        description="The splice depths k (top blocks spliced, with the head); default 1 to "
        "the number of blocks. Fewer: less time on a large model.",
    )
    quantization_bits: list[int] = Field(
        [8, 4],
        description="Evaluate the unlearned model after RTN quantization to these bit "
        "widths, a recovery attack judged against the original and the never-learned control "
        "quantized the same way, once per audit (empty: off).",
    )

    quantize_embeddings: bool = Field(
        False,
        description="Quantize the input embeddings and the LM head too (off: like GPTQ and "
        "AWQ, keep them in full precision); every other weight matrix always is.",
    )

    @field_validator("quantization_bits")
    @classmethod
    def _bit_widths(cls, value: list[int]) -> list[int]:
        bad = [b for b in value if not 2 <= b <= 16]
        if bad:
            raise ValueError(f"bit widths must be between 2 and 16, got {bad}")
        return value

    seed: Seed = Field(0, description="Seed of every stochastic stage.")
    device: Device = Field("auto", description="auto, cpu, mps, cuda or cuda:N.")
    precision: Precision = Field(
        "auto",
        description="How the training stages (unlearning, relearning, the control's too) "
        "compute: fp32; bf16-mixed (fp32 master weights and optimizer state, forward passes "
        "under bf16 autocast); bf16 (pure bf16 weights and AdamW state: lossy, most updates at "
        "a 7B model's learning rate round away); auto: bf16-mixed on a CUDA GPU that computes "
        "in bf16, else fp32. Trained checkpoints are stored in their original's dtype; "
        "evaluation, extraction and Fisher run in each checkpoint's own dtype.",
    )
    gradient_checkpointing: Checkpointing = Field(
        "auto",
        description="Recompute each block's activations in the backward pass of the training "
        "stages: their activation memory shrinks to about one block's, for about a third more "
        "compute; the results do not change. auto: each training stage turns it on where its "
        "estimated peak without it exceeds 90% of the memory of the device it runs on (a CUDA "
        "GPU's, or $UNLEARNING_AUDIT_DEVICE_MEMORY), the model supports it and it lowers the "
        "peak; off on a device of unknown memory. Each stage's manifest records whether it was "
        "on.",
    )
    gpus: PositiveInt = Field(
        1,
        le=64,
        description="GPUs one stage uses: the training stages (unlearn, relearn) shard the "
        "model across them (FSDP, one process per GPU), the inference stages (evaluate, "
        "extract) split it across them (device_map); Fisher uses one. See docs/scale.md.",
    )
    fisher_layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        min_length=1,
        description="Layers whose Fisher is computed (0: the embeddings, i: block i, L + 1: "
        "the final norm and head of L blocks); default all. Fewer layers: less memory and time.",
    )
    fisher_batch_size: PositiveInt = Field(
        16,
        le=1024,
        description="The most samples per per-sample-gradient pass of the Fisher stage "
        "(memory: this many copies of the chosen layers' gradients): the stage starts at the "
        "largest pass size up to it whose estimate fits 90% of the memory of its device (1 at "
        "worst; this one without a known budget), halved on out-of-memory; also the rows per "
        "data batch. Values unchanged.",
    )
    fisher_model_samples: int = Field(
        1,
        ge=0,
        le=64,
        description="Label draws per row for the model's Fisher (labels drawn from the "
        "model's own predictions at each answer position, Monte Carlo, seeded by seed), "
        "computed beside the empirical Fisher (the data's labels) on the same rows; costs about "
        "this many times the empirical one. 0: the empirical Fisher only.",
    )
    keep_relearned: bool = Field(
        False,
        description="Store the relearned checkpoint (one per unlearned model). Off: only its "
        "recovery curves, per-fact scores, activations and weight change are stored.",
    )
    allow_pickle: bool = Field(False, description="Allow pickle (.bin) weights. Unsafe.")
    trust_remote_code: bool = Field(False, description="Allow model code from the checkpoint.")
    store: Location | None = Field(
        None, description="Artifact store URL; default $UNLEARNING_AUDIT_STORE or ./audit-store."
    )
    name: str | None = Field(None, description="A label for this audit in reports and listings.")

    @field_validator("layers", "fisher_layers", "splice_depths")
    @classmethod
    def _distinct_layers(cls, value: list[int] | None) -> list[int] | None:
        return value if value is None else sorted(set(value))

    @field_validator("name")
    @classmethod
    def _name_inside_store(cls, value: str | None) -> str | None:
        """A name may become a path in the store or a report folder: none that would leave it."""
        return value if value is None else check_key(value)

    def with_default_lrs(self) -> AuditParams:
        """Unset learning rates filled with the embedded model's (EMBEDDED_LR) when it is the
        original; for other checkpoints they stay unset and each training stage derives one
        from the model's size (training.default_lr)."""
        if self.original != "embedded":
            return self
        methods = [m.model_copy(update={"lr": m.lr or EMBEDDED_LR}) for m in self.methods]
        relearn = self.relearn.model_copy(update={"lr": self.relearn.lr or EMBEDDED_LR})
        return self.model_copy(update={"methods": methods, "relearn": relearn})

    @property
    def relearn_sources(self) -> list[str]:
        """The relearning sources that run: forget-half only where facts have groups."""
        return [s for s in self.relearn.sources if s != "forget-half" or self.data.has_groups]


class Setting(_Config):
    """One unlearning setting of a study: the hyperparameters shared by every method in it."""

    lr: Rate = 1e-3
    steps: Steps = 100
    retain_weight: Weight = 1.0
    stop_at_forget_em: float | None = Field(None, ge=0, le=1)
    check_every: PositiveInt = 2

    @property
    def label(self) -> str:
        """Short name for the findings' tables, e.g. "lr=0.002 steps=100 stop<0.1"."""
        weight = f" w={self.retain_weight:g}" if self.retain_weight != 1 else ""
        stop = "" if self.stop_at_forget_em is None else f" stop<{self.stop_at_forget_em:g}"
        return f"lr={self.lr:g} steps={self.steps}{weight}{stop}"


STUDY_SOURCES: list[RelearnSource] = ["forget", "forget-half", "retain", "unrelated"]


class StudyParams(_Config):
    """The paper's grid: methods x domains x settings on one checkpoint (default: embedded)."""

    methods: list[str] = Field(list(METHODS), min_length=1, description="Unlearning methods.")
    domains: list[Domain] = Field(["text", "code", "math"], min_length=1)
    settings: list[Setting] = Field(
        default_factory=lambda: [
            Setting(lr=2e-3, steps=100, stop_at_forget_em=0.1),
            Setting(lr=1e-3, steps=100, retain_weight=3.0),
            Setting(lr=3e-4, steps=100, retain_weight=3.0),
        ],
        min_length=1,
        description="Hyperparameter settings (distinct learning rates); every method runs "
        "under each: strong ascent stopped at collapse, and two retain-anchored runs.",
    )
    requests: list[PositiveInt] = Field(
        [1],
        min_length=1,
        description="Repeated-request axis: every method and setting unlearns in each of these "
        "numbers of successive requests (1: one request; UnlearnConfig.requests).",
    )
    request_split: RequestSplit = Field(
        "disjoint",
        description="Requests beyond one: disjoint parts of the forget set, or the whole set "
        "repeated (UnlearnConfig.request_split).",
    )
    confirm_seeds: int = Field(
        2,
        ge=0,
        le=10,
        description="A run that reads irreversible without catastrophe is audited again under "
        "this many further seeds, so the findings say how robust it is.",
    )
    batch_size: PositiveInt = 16
    embedded: EmbeddedConfig = Field(default_factory=EmbeddedConfig)
    relearn: RelearnConfig = Field(
        default_factory=lambda: RelearnConfig(sources=STUDY_SOURCES),
        description="The relearning attack; its sources are the study's relearning-source axis "
        "(by default all four).",
    )
    thresholds: Thresholds = Field(default_factory=Thresholds)
    seed: Seed = 0
    device: Device = "auto"
    store: Location | None = None

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        return [UnlearnConfig(method=m).method for m in value]

    @field_validator("requests")
    @classmethod
    def _distinct_requests(cls, value: list[int]) -> list[int]:
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _distinct_runs(self) -> StudyParams:
        """Every run of the grid must have its own label (rows are matched to runs by it)."""
        labels = [
            UnlearnConfig(method=m, requests=k, **s.model_dump()).label
            for s in self.settings
            for k in self.requests
            for m in self.methods
        ]
        if repeated := sorted({label for label in labels if labels.count(label) > 1}):
            raise ValueError(
                f"settings give runs the same label ({', '.join(repeated)}): settings must "
                "differ in lr, steps, early stop, or (for GD and KL) retain weight"
            )
        return self

    @classmethod
    def quick(cls, **update) -> StudyParams:
        """A small grid that still has every axis (CI's and a first look's): one domain, two
        methods, two settings, one and two requests, three relearning sources."""
        base = {
            "domains": ["text"],
            "methods": ["GA", "NPO+KL"],
            "settings": [
                {"lr": 2e-3, "steps": 100, "stop_at_forget_em": 0.1},
                {"lr": 3e-4, "steps": 100, "retain_weight": 3.0},
            ],
            "requests": [1, 2],
            "relearn": {"sources": ["forget", "forget-half", "retain"]},
            "confirm_seeds": 1,
        }
        return cls.model_validate(base | update)

    def runs(self) -> dict[str, tuple[UnlearnConfig, dict]]:
        """Every unlearning run of the grid in one domain, by label: its config and what the
        findings group it by (setting, requests)."""
        return {
            cfg.label: (cfg, {"setting": s.label, "requests": k})
            for s in self.settings
            for k in self.requests
            for m in self.methods
            for cfg in [
                UnlearnConfig(
                    method=m,
                    batch_size=self.batch_size,
                    requests=k,
                    request_split=self.request_split,
                    **s.model_dump(),
                )
            ]
        }

    def audit(
        self, domain: str, seed: int | None = None, labels: list[str] | None = None
    ) -> AuditParams:
        """The audit of one domain: every run of the grid (or those ``labels``), under the
        study's seed or ``seed``."""
        runs = self.runs()
        seed = self.seed if seed is None else seed
        return AuditParams(
            methods=[runs[label][0] for label in (labels or runs)],
            data=DataConfig(domain=domain),
            embedded=self.embedded,
            relearn=self.relearn,
            thresholds=self.thresholds,
            seed=seed,
            device=self.device,
            store=self.store,
            name=f"study: {domain}" + (f", seed {seed}" if seed != self.seed else ""),
        )
