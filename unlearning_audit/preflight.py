"""Checks run before any stage: every problem with an audit's inputs, reported at once,
before a model is loaded or a GPU is touched."""

from __future__ import annotations

import os
from pathlib import Path

from . import checkpoints, corpus, data, distributed, plan, prompts, runtime
from .config import DEFAULT_METHODS, AuditParams
from .store import Store, default_store_url


def preflight(params: AuditParams) -> str:
    """Validate checkpoints (a local folder's files too, and local folders against the
    original: see checkpoints.check_folder and compatibility_problems), data sources and the
    store; return the store URL.

    Raises one ValueError listing every problem found.
    """
    problems, sound = [], {}
    specs = {"original": params.original, "unlearned": params.unlearned, "control": params.control}
    for role, spec in specs.items():
        if spec is None:
            continue
        try:
            parsed = checkpoints.parse(spec)
            if parsed.kind == "local":  # others are checked the same way once fetched
                checkpoints.check_folder(
                    Path(parsed.location), params.allow_pickle, params.trust_remote_code
                )
                sound[role] = Path(parsed.location)
        except ValueError as exc:
            problems.append(f"{role}: {exc}")
    if "original" in sound:  # others are compared once fetched (tasks.checkpoint)
        try:
            problems += checkpoints.compatibility_problems(sound)
        except ValueError as exc:
            problems.append(f"compatibility: {exc}")
    sources = {
        "forget": params.data.forget,
        "retain": params.data.retain,
        "unrelated": params.data.unrelated,
    }
    if (sources["forget"] is None) != (sources["retain"] is None):
        problems.append("data: give both a forget and a retain source, or neither")
    if sources["forget"] is None and params.original != checkpoints.EMBEDDED:
        problems.append(
            "data: a checkpoint other than the embedded one needs forget and retain "
            "sources (data.forget, data.retain)"
        )
    missing = [
        role
        for role, source in sources.items()
        if source
        and Path(source).suffix.lower() in data.FORMATS
        and not Path(source).expanduser().exists()
    ]
    problems += [f"data.{role}: file {sources[role]!r} does not exist" for role in missing]
    sets = None
    if sources["forget"] is not None and sources["retain"] is not None and not missing:
        try:
            sets = data.external_sets(params.data)
            data.check_sets(sets)
            problems += _source_problems(params, sets)
            if "original" in sound:
                problems += _rendering_problems(params, sound["original"], sets)
        except ValueError as exc:
            problems.append(f"data: {exc}")
    # the precision is checked on a device this machine has
    problems += _device_problems(params.device) or _precision_problems(params)
    problems += _layer_problems(params) + _lora_problems(params) + _gpus_problems(params)
    problems += _checkpointing_problems(params, sound.get("original"))
    problems += _request_problems(params, sets)
    if (
        params.unlearned is None
        and params.original != checkpoints.EMBEDDED
        and params.methods == DEFAULT_METHODS
    ):
        problems.append(
            "methods: the default methods are the embedded model's, tuned to its size; give "
            "the methods to run (--method, with --lr or the size-scaled default)"
        )
    if not params.methods and params.unlearned is None:
        problems.append("methods: give at least one unlearning method, or an unlearned checkpoint")
    if not problems:  # the plan reads a sound original and data
        problems += _memory_problems(params, sets)
    url = params.store or default_store_url()
    try:
        Store(url).check_writable()
    except ValueError as exc:
        problems.append(f"store: {exc}")
    if problems:
        raise ValueError("invalid audit:\n  - " + "\n  - ".join(problems))
    return url


def warnings(params: AuditParams) -> list[str]:
    """What weakens an audit that can still run: no control, no groups."""
    out = []
    if params.control is None and (params.no_control or params.original != checkpoints.EMBEDDED):
        out.append(
            "no never-learned control (--control): relearning on the forget set cannot tell "
            "latent knowledge from re-memorisation, so only the held-out half is judged, "
            "against chance where rows name their attribute"
        )
    if not params.data.has_groups:
        out.append(
            "the facts have no groups (--group): the held-out half is unavailable, since "
            "halves split by question would put one group's facts on both sides"
        )
    return out


def _source_problems(params: AuditParams, sets: dict[str, list[dict]]) -> list[str]:
    """Relearning sources the data cannot feed: forget-half without two groups, unrelated
    without an unrelated set (each would fail after unlearning has run)."""
    problems = []
    if "forget-half" in params.relearn_sources and not (sets["forget_a"] and sets["forget_b"]):
        problems.append(
            "data: relearning source 'forget-half' needs a forget set of at least "
            "two groups (data.group), to hold out whole groups"
        )
    if "unrelated" in params.relearn_sources and not sets["unrelated"]:
        problems.append(
            "data: relearning source 'unrelated' needs an unrelated set (data.unrelated, "
            "--unrelated)"
        )
    return problems


def _rendering_problems(
    params: AuditParams, folder: Path, sets: dict[str, list[dict]]
) -> list[str]:
    """Rows the original's tokenizer cannot render in the audit's prompt format (a chat format
    without a chat template, an answer with no tokens): every stage renders them so, after
    loading the model. The folder has passed check_folder."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=params.trust_remote_code)
    try:
        fmt = prompts.renderer(tokenizer, params.data.prompt_format, params.data.separator)
        for name in ("forget", "retain", "unrelated"):
            fmt.encode(sets[name])
    except ValueError as exc:
        return [f"prompt format {params.data.prompt_format!r}: {exc}"]
    return []


def _memory_problems(params: AuditParams, sets: dict[str, list[dict]] | None) -> list[str]:
    """Stages whose estimated peak (plan.plan_audit) exceeds the memory of the device they run
    on, each naming the settings under which every stage would fit. A CPU device is not
    held to a budget (plan.device_budget), nor a remote original (planned by `--plan` once a
    local copy is given; its config.json is read only when the audit fetches it)."""
    if checkpoints.parse(params.original).kind not in ("embedded", "local"):
        return []
    try:
        if plan.device_budget(params.device) is None:
            return []  # nothing to refuse: not worth building the model's shape
        return plan.plan_audit(params, sets).problems()
    except ValueError as exc:  # a device memory setting that is no size
        return [f"memory: {exc}"]


def _device_problems(device: str) -> list[str]:
    """A device asked for that this machine does not have (a CUDA or MPS device, or a CUDA
    index past the last GPU)."""
    import torch

    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            return [f"device: {device!r} was asked for, but torch sees no CUDA device"]
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            return [f"device: {device!r} was asked for, but torch sees {count} CUDA device(s)"]
    if device == "mps" and not torch.backends.mps.is_available():
        return ["device: 'mps' was asked for, but torch sees no MPS device"]
    return []


def _gpus_problems(params: AuditParams) -> list[str]:
    """gpus > 1 where a stage cannot use them (distributed.gpu_problems, on this machine's
    device), or with training batches too small to give every GPU a row per micro-batch.

    A deployed audit (UNLEARNING_AUDIT_DISPATCH=deployed) runs its GPU stages on the `gpu`
    pool's machines, which check their own GPUs: the flow's machine may have none."""
    if params.gpus == 1:
        return []
    problems = []
    device = runtime.resolve_device(params.device)
    if not (os.environ.get("UNLEARNING_AUDIT_DISPATCH") == "deployed" and device.type == "cpu"):
        problems += distributed.gpu_problems(params.gpus, device)
    configs = {"relearn": params.relearn}
    if params.unlearned is None:
        configs |= {f"method {m.label}": m for m in params.methods}
    for name, cfg in configs.items():
        if cfg.batch_size < params.gpus * cfg.micro_batches:
            problems.append(
                f"{name}: batch_size {cfg.batch_size} cannot be shared by {params.gpus} GPUs "
                f"in {cfg.micro_batches} micro-batch(es) each; give a batch of at least "
                f"{params.gpus * cfg.micro_batches} rows"
            )
    return problems


def _precision_problems(params: AuditParams) -> list[str]:
    """bf16 asked for (bf16 or bf16-mixed) on a device that does not compute in it."""
    device = runtime.resolve_device(params.device)
    if params.precision not in ("bf16", "bf16-mixed") or runtime.supports_bf16(device):
        return []
    return [
        f"precision: {params.precision!r} was asked for, but {device} does not compute in "
        "bfloat16 (a CUDA GPU needs compute capability 8.0, Ampere, or later); use fp32 or auto"
    ]


def _lora_problems(params: AuditParams) -> list[str]:
    """LoRA asked for (a method's or relearning's lora_rank) without peft installed."""
    import importlib.util

    lora = [m.label for m in params.methods if m.lora_rank] if params.unlearned is None else []
    lora += ["relearning"] if params.relearn.lora_rank else []
    if lora and importlib.util.find_spec("peft") is None:
        return [
            f"lora_rank: {', '.join(lora)} train LoRA adapters, which needs peft: "
            "pip install 'unlearning-audit[lora]'"
        ]
    return []


def _checkpointing_problems(params: AuditParams, original: Path | None) -> list[str]:
    """Gradient checkpointing asked for (True; auto turns it on only where the model supports
    it) on a local original whose transformers model class does not support it (the embedded
    Llama does; remote code is judged when it loads)."""
    asked = params.gradient_checkpointing is True
    if not asked or original is None or params.trust_remote_code:
        return []
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(original)
    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if model_class is None or model_class.supports_gradient_checkpointing:
        return []  # an unknown class is the compatibility check's to report
    return [f"gradient_checkpointing: {model_class.__name__} does not support it; leave it off"]


def _request_problems(params: AuditParams, sets: dict[str, list[dict]] | None) -> list[str]:
    """Methods in several unlearning requests (UnlearnConfig.requests) that cannot run: more
    disjoint requests than forget rows (the embedded forget set is built here to count them;
    external sets are counted where they loaded), or several requests on several GPUs (each
    request is a training run of its own, and a model sharded for one cannot train again)."""
    split = [m for m in params.methods if m.requests > 1] if params.unlearned is None else []
    if not split:
        return []
    if sets is None and params.original == checkpoints.EMBEDDED:
        facts, forget = corpus.embedded(params.embedded)
        sets = data.embedded_sets(facts, forget, params.data.domain)
    rows = None if sets is None else len(sets["forget"])
    problems = [
        f"method {m.label}: {m.requests} disjoint requests need at least {m.requests} forget "
        f"rows, the forget set has {rows}; ask for fewer requests, or request_split 'repeat'"
        for m in split
        if m.request_split == "disjoint" and rows is not None and m.requests > rows
    ]
    if params.gpus > 1:
        problems.append(
            f"gpus: {params.gpus} GPUs cannot run several unlearning requests "
            f"({', '.join(m.label for m in split)}); run them on one GPU (--gpus 1)"
        )
    return problems


def _layer_problems(params: AuditParams) -> list[str]:
    """Activation layers (0 = embeddings, i = block i-1), Fisher layers (parameter layers:
    also L + 1, the final norm and head) and splice depths (1 to L blocks) that the original
    model of L blocks does not have.

    Read from a local folder's config.json (checkpoints.num_blocks, as untrusted as the rest
    of the folder); a remote or hub original is checked when the extract or Fisher stage loads
    it.
    """
    asked = {  # field: (values, lowest, highest past the blocks, what they count)
        "layers": (params.layers, 0, 0, "layers"),
        "fisher_layers": (params.fisher_layers, 0, 1, "layers"),
        "splice_depths": (params.splice_depths if params.splice else None, 1, 0, "blocks"),
    }
    asked = {field: spec for field, spec in asked.items() if spec[0] is not None}
    if not asked:
        return []
    if params.original == checkpoints.EMBEDDED:
        blocks = params.embedded.layers
    else:
        try:
            blocks = checkpoints.num_blocks(Path(params.original).expanduser())
        except ValueError:
            return []  # check_folder reports what is wrong with config.json
        if blocks is None:
            return []
    problems = []
    for field, (layers, first, beyond, noun) in asked.items():
        last = blocks + beyond
        if bad := [layer for layer in layers if not first <= layer <= last]:
            problems.append(f"{field}: {bad} do not exist; the model has {noun} {first} to {last}")
    return problems
