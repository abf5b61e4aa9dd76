"""The audit flow: one checkpoint through every stage, each a task passing store references.

fetch -> unlearn (per method) -> evaluate -> relearn -> evaluate -> extract -> metrics ->
splice (the causal layer test) -> verdict -> report. Run locally, everything runs in this
process; every stage is served from the store when its inputs, config and code are unchanged.
Every stage that loads a model gets the audit's ``trust_remote_code``: whether a checkpoint may
run its own code is the current run's decision, never read from the store. Deployed, every model
stage of the audit (the fetches, the original's measurements, the control's, each unlearned
model's from unlearning to verdict) goes to the gpu pool as one stage group, one flow run
(tasks._stage.stage_group): an audit hands over to the pool once, not once per stage or model.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from tasks._progress import StageProgress
from tasks._stage import group_ran_on_pool, ref_of, stage_group
from tasks.checkpoint import check_compatible, fetch_checkpoint
from tasks.data import prepare_data
from tasks.evaluate import evaluate
from tasks.extract import extract
from tasks.fisher import fisher
from tasks.metrics import metrics
from tasks.probe import probe
from tasks.relearn import relearn
from tasks.report import publish, report
from tasks.splice import splice_run
from tasks.unlearn import unlearn
from tasks.verdict import check_known, verdict
from unlearning_audit import relearning
from unlearning_audit.config import AuditParams, UnlearnConfig
from unlearning_audit.preflight import preflight, warnings
from unlearning_audit.store import ArtifactRef

# The default as an instance, not None: the deployment's UI run form then shows every field
# with its description and default value.
DEFAULT_PARAMS = AuditParams()


def _fetch(store: str, params: AuditParams, spec: str, submit: bool = False):
    """A checkpoint of the audit, fetched with its trust settings; with ``submit``, a future of
    it, fetched beside whatever runs next."""
    call = fetch_checkpoint.submit if submit else fetch_checkpoint
    return call(
        store,
        spec,
        params.embedded,
        allow_pickle=params.allow_pickle,
        trust_remote_code=params.trust_remote_code,
    )


def _control(store: str, params: AuditParams):
    """The never-learned control's fetch, submitted to run beside the original's (the embedded
    control pretrains on the other core); None without a control."""
    if params.no_control:
        return None
    if params.control is not None:
        return _fetch(store, params, params.control, submit=True)
    if params.original == "embedded":
        return fetch_checkpoint.submit(store, "embedded", params.embedded, control=True)
    return None


def _relearn_all(
    store: str,
    params: AuditParams,
    checkpoint: ArtifactRef,
    data_ref: ArtifactRef,
    original: ArtifactRef | None,
) -> dict[str, list[ArtifactRef]]:
    """Every relearning run of one checkpoint: per source, one per seed. With ``original`` (an
    unlearned checkpoint's runs), the first forget-set run also stores the relearned model's
    activations and weight change against ``original`` (the probe and metrics stages read them),
    and with keep_relearned its checkpoint."""

    def measured(src: str, k: int) -> bool:
        return original is not None and src == "forget" and k == 0

    return {
        src: [
            relearn(
                store,
                checkpoint,
                data_ref,
                src,
                params.relearn,
                seed,
                params.device,
                params.data.eval_max_rows,
                keep_checkpoint=params.keep_relearned and measured(src, k),
                generate=params.thresholds.metric == "rouge_l",
                trust_remote_code=params.trust_remote_code,
                precision=params.precision,
                original=original if measured(src, k) else None,
                layer_indices=params.layers,
                gradient_checkpointing=params.gradient_checkpointing,
                gpus=params.gpus,
            )
            for k, seed in enumerate(relearning.seeds(params.seed, params.relearn.seeds))
        ]
        for src in params.relearn_sources
    }


def _fisher(
    store: str,
    params: AuditParams,
    checkpoint: ArtifactRef,
    data_ref: ArtifactRef,
    model: str,
    summary_only: bool = False,
) -> dict:
    """One checkpoint's Fisher as the metrics and the report read it: ``ref``, its artifact
    (None with the Fisher off, or where the stage failed after its retries), and on a failure
    ``failed``, why; with ``summary_only`` (an unlearned model's) its summary alone is stored
    (tasks/fisher.py). A failed Fisher does not stop the audit: it goes on without the Fisher of
    this ``model``, with a warning, and the report says so."""
    if not params.fisher:
        return {"ref": None}
    state = fisher(
        store,
        checkpoint,
        data_ref,
        layers=params.fisher_layers,
        batch_size=params.fisher_batch_size,
        device=params.device,
        trust_remote_code=params.trust_remote_code,
        summary_only=summary_only,
        model_samples=params.fisher_model_samples,
        seed=params.seed,
        return_state=True,
    )
    if state.is_completed():
        return {"ref": state.result()}
    get_run_logger().warning(
        "the Fisher of the %s model failed; the audit goes on without it: %s", model, state.message
    )
    return {"ref": None, "failed": state.message}


def _evaluate(
    store: str, params: AuditParams, checkpoint: ArtifactRef, data_ref: ArtifactRef, **options
):
    """The evaluate stage of ``checkpoint`` as the audit runs it (its rows, device, trust and
    GPUs); ``options``: the quantization attack's."""
    return evaluate(
        store,
        checkpoint,
        data_ref,
        params.data.eval_max_rows,
        params.device,
        trust_remote_code=params.trust_remote_code,
        gpus=params.gpus,
        **options,
    )


def _extract(store: str, params: AuditParams, checkpoint: ArtifactRef, data_ref: ArtifactRef):
    """The extract stage of ``checkpoint`` as the audit runs it."""
    return extract(
        store,
        checkpoint,
        data_ref,
        params.layers,
        params.data.eval_max_rows,
        params.device,
        trust_remote_code=params.trust_remote_code,
        gpus=params.gpus,
    )


def _quantized(
    store: str, params: AuditParams, checkpoint: ArtifactRef, data_ref: ArtifactRef
) -> dict[str, ArtifactRef]:
    """The quantization attack's evaluations of ``checkpoint``, by bit width (none without
    quantization_bits)."""
    return {
        str(bits): _evaluate(
            store, params, checkpoint, data_ref, bits=bits, embeddings=params.quantize_embeddings
        )
        for bits in params.quantization_bits
    }


def _control_evals(
    store: str, params: AuditParams, control: ArtifactRef | None, data_ref: ArtifactRef
) -> dict | None:
    """The never-learned control's evaluations as quantization's reference, once per audit:
    ``eval`` unquantized and ``quantized`` by bit width; None without a control or without
    quantization."""
    if control is None or not params.quantization_bits:
        return None
    return {
        "eval": _evaluate(store, params, control, data_ref),
        "quantized": _quantized(store, params, control, data_ref),
    }


def _control_side(
    store: str, params: AuditParams, control: ArtifactRef | None, data_ref: ArtifactRef
) -> tuple[dict[str, list[ArtifactRef]], dict | None]:
    """The never-learned control's relearning runs and evaluations (_control_evals); none
    without a control."""
    if control is None:
        return {}, None
    runs = _relearn_all(store, params, control, data_ref, None)
    return runs, _control_evals(store, params, control, data_ref)


def audit_run(
    store: str,
    params: AuditParams,
    data_ref: ArtifactRef,
    original: dict,
    candidate: dict,
    control_runs: dict[str, list[ArtifactRef]],
    control_evals: dict | None = None,
) -> dict:
    """Unlearn (a candidate of a method), evaluate, relearn, extract, compare and judge one
    unlearned checkpoint; quantization is judged against the original's
    (``original['quantized']``) and the control's (``control_evals``: _control_evals)
    evaluations at the same bit widths."""
    rows, trust = params.data.eval_max_rows, params.trust_remote_code
    if "checkpoint" in candidate:
        unlearned = candidate["checkpoint"]
    else:
        unlearned = _unlearn(store, params, original["checkpoint"], data_ref, candidate["config"])
    unlearned_eval = _evaluate(store, params, unlearned, data_ref)
    relearned = _relearn_all(store, params, unlearned, data_ref, original["checkpoint"])
    measured = relearned["forget"][0]  # holds the relearned model's activations, weight change
    acts = {"unlearned": _extract(store, params, unlearned, data_ref), "relearned": measured}
    quantized = _quantized(store, params, unlearned, data_ref)
    references = {"original": original["quantized"]}
    if control_evals is not None:
        references["control"] = control_evals["quantized"]
    fishers = {
        "original": original["fisher"],
        "unlearned": _fisher(store, params, unlearned, data_ref, candidate["label"], True),
    }
    spliced = None
    if params.splice:
        spliced = splice_run(
            store,
            original["checkpoint"],
            unlearned,
            data_ref,
            params.thresholds,
            params.splice_depths,
            rows,
            params.device,
            trust_remote_code=trust,
            gpus=params.gpus,
        )
    probed = None
    if params.probes:
        probed = {"original": original["probe"]} | {
            name: probe(store, data_ref, ref, acts[name], rows, params.seed)
            for name, ref in (("unlearned", unlearned), ("relearned", measured))
        }
    return {
        **{k: candidate[k] for k in ("label", "method", "lr")},
        "relearned": relearned,
        "fisher": fishers,
        "original_eval": original["eval"],
        "unlearned_eval": unlearned_eval,
        "metrics_unlearned": metrics(
            store,
            original["checkpoint"],
            unlearned,
            original["acts"],
            acts["unlearned"],
            fishers["original"]["ref"],
            fishers["unlearned"]["ref"],
            trust_remote_code=trust,
        ),
        "metrics_relearned": metrics(
            store,
            original["checkpoint"],
            measured,
            original["acts"],
            acts["relearned"],
            trust_remote_code=trust,
            stored_change=True,
        ),
        "quantized": quantized,
        "probes": probed,
        "splice": spliced,
        "verdict": verdict(
            store,
            data_ref,
            original["eval"],
            unlearned_eval,
            relearned,
            control_runs,
            params.thresholds,
            quantized,
            probed,
            quantized_references=references,
            control_eval=control_evals["eval"] if control_evals else None,
        ),
    }


def _original(store: str, params: AuditParams, checkpoint: ArtifactRef, data_ref: ArtifactRef):
    """The original's evaluation (refused before any training where it does not know the
    facts), activations, Fisher, probes and quantized evaluations (quantization's reference,
    once per audit)."""
    original_eval = _evaluate(store, params, checkpoint, data_ref)
    check_known(store, data_ref, original_eval, params.thresholds)  # before any training
    original = {
        "checkpoint": checkpoint,
        "eval": original_eval,
        "acts": _extract(store, params, checkpoint, data_ref),
        "fisher": _fisher(store, params, checkpoint, data_ref, "original"),
        "quantized": _quantized(store, params, checkpoint, data_ref),
    }
    if params.probes:
        rows = params.data.eval_max_rows
        original["probe"] = probe(store, data_ref, checkpoint, original["acts"], rows, params.seed)
    return original


def _candidates(params: AuditParams, given: ArtifactRef | None) -> list[dict]:
    """The unlearned checkpoints to judge: the given one (mode b), or one per method (its
    ``config``: audit_run unlearns it)."""
    if given is not None:
        return [{"label": "given", "method": "given", "lr": None, "checkpoint": given}]
    return [
        {"label": cfg.label, "method": cfg.method, "lr": cfg.lr, "config": cfg}
        for cfg in params.methods
    ]


def _unlearn(
    store: str,
    params: AuditParams,
    checkpoint: ArtifactRef,
    data_ref: ArtifactRef,
    cfg: UnlearnConfig,
):
    """The unlearned checkpoint of one method's run."""
    return unlearn(
        store,
        checkpoint,
        data_ref,
        cfg,
        params.seed,
        params.device,
        trust_remote_code=params.trust_remote_code,
        precision=params.precision,
        gradient_checkpointing=params.gradient_checkpointing,
        gpus=params.gpus,
    )


def _described(params: AuditParams, control) -> dict:
    """What the report says of the audit itself."""
    domain = params.data.domain if not params.data.external else "external data"
    return {
        "name": params.name or f"{params.original} ({domain})",
        "original": params.original,
        "unlearned": params.unlearned,
        "domain": domain,
        "budget": params.relearn.budget,
        "heldout": None
        if params.data.has_groups
        else "the facts have no groups (data.group), and halves split by question "
        "would put a group's facts on both sides",
        "thresholds": params.thresholds.model_dump(),
        "control": params.control or ("embedded never-learned" if control else None),
        "fisher": {"layers": params.fisher_layers, "model_samples": params.fisher_model_samples}
        if params.fisher
        else None,
    }


def _milestones(params: AuditParams) -> int:
    """The audit's progress steps: the models fetched, the original measured, the control
    relearned, each unlearned model judged, the report."""
    return 4 + (1 if params.unlearned is not None else len(params.methods))


@stage_group("models of {params.original}")
def audit_models(
    store: str, params: AuditParams, data_ref: ArtifactRef, progress: str | None
) -> dict:
    """Every model stage of the audit, one stage group: fetch the checkpoints (the control's
    beside the original's), measure the original, relearn the control, judge each unlearned
    model; ``progress``, the audit's own progress artifact, advances at each step where the
    stages run (not again as the audit serves them after the group's run on the gpu pool).
    Gives the control's checkpoint (or None), its runs, and the judged runs."""
    bar, steps = StageProgress("audit", artifact=progress), _milestones(params)

    def advance(done: int, total: int) -> None:
        if not group_ran_on_pool():
            bar(done, total)

    control_fetch = _control(store, params)
    checkpoint = _fetch(store, params, params.original)
    given = _fetch(store, params, params.unlearned) if params.unlearned is not None else None
    control = control_fetch.result() if control_fetch is not None else None
    check_compatible(store, {"original": checkpoint, "unlearned": given, "control": control})
    advance(1, steps)
    original = _original(store, params, checkpoint, data_ref)
    advance(2, steps)
    control_runs, control_evals = _control_side(store, params, control, data_ref)
    advance(3, steps)
    runs = []
    for candidate in _candidates(params, given):
        runs.append(
            audit_run(store, params, data_ref, original, candidate, control_runs, control_evals)
        )
        advance(3 + len(runs), steps)
    return {"control": control, "control_runs": control_runs, "runs": runs}


@flow(name="audit-checkpoint")
def audit_checkpoint(params: AuditParams = DEFAULT_PARAMS) -> dict:
    """Audit one checkpoint: is the forgotten knowledge gone, or only hidden?

    The run's own progress artifact advances at each milestone: the models fetched (or the
    embedded ones built), the original measured, the control relearned, each unlearned model
    judged, the report."""
    store = preflight(params)
    for warning in warnings(params):
        get_run_logger().warning(warning)
    params = params.with_default_lrs()
    with StageProgress("audit") as progress:
        data_ref = prepare_data(store, params.data, params.embedded)
        models = audit_models(store, params, data_ref, progress.artifact)
        described = _described(params, models["control"])
        report_ref = report(store, described, models["runs"], models["control_runs"])
        published = publish(store, report_ref)
        steps = _milestones(params)
        progress(steps, steps)
    return {**published, "report_ref": ref_of(report_ref).model_dump()}
