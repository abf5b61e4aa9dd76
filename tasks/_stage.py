"""What every stage task shares: running a build through the store's cache, and loading inputs.

Beyond the cache, a stage build here is made robust for GPUs: task retries with exponential
backoff, a rebuild with twice the micro-batches after an out-of-memory error, and (test-only)
faults injected from a file. When deployed (UNLEARNING_AUDIT_DISPATCH=deployed), a stage that is
not in the store and belongs to another work pool than this process's flow run (GPU stages: the
`gpu` pool) runs there as a flow run of the `stage` deployment (flows/dispatch.py), so a cache
hit never leaves the calling process and a retried flow resumes at the first stage not yet
stored. Called inside a stage group (a function decorated with :func:`stage_group`, such as every
model stage of an audit), the first such stage runs the whole group there as one flow
run instead, and every stage of the group is then served from the store: one hand-over to the
pool per group, not per stage.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gc
import importlib
import inspect
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import torch
from prefect import Task, get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.context import TaskRunContext
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from unlearning_audit import (
    adapters,
    checkpoints,
    data,
    distributed,
    plan,
    prompts,
    runtime,
    scratch,
)
from unlearning_audit.config import Checkpointing
from unlearning_audit.store import ArtifactRef, CorruptArtifact, Store, code_version

DISPATCH_ENV = "UNLEARNING_AUDIT_DISPATCH"
FAULTS_ENV = "UNLEARNING_AUDIT_FAULTS"
OOM_SPLITS_ENV = "UNLEARNING_AUDIT_OOM_SPLITS"
POLL_ENV = "UNLEARNING_AUDIT_DISPATCH_POLL"


class StageRunFailed(RuntimeError):
    """A stage's flow run on its work pool did not complete.

    It already retried there, so the calling task retries only a run that crashed (its process
    died), never one that failed.
    """

    def __init__(self, message: str, crashed: bool):
        super().__init__(message)
        self.crashed = crashed

    def __reduce__(self):  # Prefect pickles a failed state's exception
        return type(self), (str(self), self.crashed)


class OutOfMemory(ValueError):
    """An out-of-memory error that splitting batches cannot help (the batch is already split
    into one-row micro-batches, or the stage has no batch to split); its message carries the
    stage's memory estimate and the settings that would fit (plan.py). A ValueError, so the
    task's retries do not rerun it: it would run out of memory the same way."""


def _retry_condition(task, task_run, state) -> bool:
    """Retry any failure except bad input (a ValueError: a retry would fail the same way, after
    loading everything again) and a dispatched stage run that failed after its own retries."""
    exc = state.data
    if isinstance(exc, ValueError):
        return False
    return not isinstance(exc, StageRunFailed) or exc.crashed


def gpu_options() -> dict:
    """Task options of the GPU stages: retries and exponential backoff (env-configurable).

    UNLEARNING_AUDIT_GPU_RETRIES (default 2) retries, the first after
    UNLEARNING_AUDIT_GPU_RETRY_DELAY seconds (default 5), each next one twice as long.
    """
    retries = int(os.environ.get("UNLEARNING_AUDIT_GPU_RETRIES", "2"))
    delay = float(os.environ.get("UNLEARNING_AUDIT_GPU_RETRY_DELAY", "5"))
    return {
        "retries": retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=delay)(retries),
        "retry_condition_fn": _retry_condition,
    }


CPU_OPTIONS: dict = {
    "retries": 1,
    "retry_delay_seconds": 2,
    "retry_condition_fn": _retry_condition,
}

POOLS: dict[str, str] = {}
"""The work pool of each stage task, by task name (stage_task): where it runs when deployed."""


def stage_task(name: str, pool: Literal["gpu", "cpu"]) -> Callable[[Callable], Task]:
    """Decorate a stage's function as its Prefect task ``name``, to run on ``pool`` when
    deployed, with that pool's retries; Prefect's own cache is off (the store caches).

    The pool is recorded here, not as a task tag: Prefect asks its API for a tag's concurrency
    slots at every run of a tagged task, about half a second each on a loaded server, which
    for the default embedded audit's 76 stage runs was most of its hand-over
    (bench/results/handover.md)."""
    if pool not in ("gpu", "cpu"):
        raise ValueError(f"{name}: pool must be 'gpu' or 'cpu', got {pool!r}")
    POOLS[name] = pool
    options = gpu_options() if pool == "gpu" else CPU_OPTIONS
    return task(name=name, cache_policy=NO_CACHE, **options)


def cached_stage(
    store_url: str,
    stage: str,
    inputs: Mapping[str, Any],
    config: Any,
    version: str,
    build: Callable[..., Mapping[str, Any] | None],
    batch: BaseModel | None = None,
    memory: Mapping[str, Any] | None = None,
):
    """Serve the stage's artifact from the store, or build and store it.

    ``memory``: the settings that change the stage's memory but not its key (``gpus``,
    ``gradient_checkpointing``), for the estimate an out-of-memory error reports.

    ``build(store, folder)`` writes the artifact's files; with ``batch`` (a training config
    with ``batch_size`` and ``micro_batches``) it is ``build(store, folder, batch)`` and is
    rerun with twice the micro-batches after an out-of-memory error. A stage served from the
    store ends in a Completed state named "Cached", as Prefect's own cache would show it. When
    deployed, a stage that is not stored and belongs to another work pool runs there instead
    (see the module docstring).
    """
    store = Store(store_url)
    logger = get_run_logger()
    version = f"{version}-{code_version(sys.modules[build.__module__])}"  # the task's own code
    pool = _remote_pool()
    group = _GROUP.get()
    if pool is not None and store.get(key := store.key_for(stage, inputs, config, version)) is None:
        if group is None:
            return _run_on_pool(pool)
        group.run_on(pool, store, key)  # the whole group there; raises if it did not store key
    name = _stage_name(stage)
    _clean_stale_once(store_url)
    described = {**config, **memory} if memory else config  # the config is a dict where given
    note = functools.partial(_memory_note, store, stage, inputs, described, batch)
    ref, cached = store.cached(
        stage,
        inputs,
        config,
        version,
        lambda out: _guarded_build(name, build, batch, store, out, note),
    )
    if cached and group is not None and ref.key in group.computed:
        message = f"computed by flow run {group.run.name} on the {group.pool} pool: {ref.key}"
        logger.info("%s: %s", stage, message)
        return Completed(message=message, data=ref)
    if cached:
        logger.info("%s: served from the store (%s)", stage, ref.key)
        return Completed(name="Cached", message=f"served from the store: {ref.key}", data=ref)
    if (computed := _HERE.get()) is not None:
        computed.add(ref.key)
    logger.info("%s: computed and stored (%s)", stage, ref.key)
    return ref


def ref_of(called: ArtifactRef | State) -> ArtifactRef:
    """The artifact a stage task call gave: a stage served from the store returns its Completed
    ("Cached") state, which a flow passes on to tasks as it is (Prefect resolves it) but must
    resolve itself to read."""
    return called.result() if isinstance(called, State) else called


@functools.cache
def _clean_stale_once(store_url: str) -> None:
    """Before this process's first build on a store, remove the temporary folders that killed
    runs on this machine left, and their builds in a local store (an out-of-memory kill of a
    worker leaves a stage's full build): a deployed worker never runs the CLI, which does the
    same at its start."""
    for path in [*scratch.clean_stale(), *Store(store_url).clean_stale_builds()]:
        get_run_logger().warning("removed %s, left by a run that was killed", path)


def _stage_name(stage: str) -> str:
    """The running task's name (what the UI and the fault file call a stage), else ``stage``."""
    ctx = TaskRunContext.get()
    return ctx.task.name if ctx else stage


# -- out of memory and injected faults ------------------------------------------------------


def _guarded_build(
    name: str,
    build: Callable[..., Mapping[str, Any] | None],
    batch: BaseModel | None,
    store: Store,
    out: Path,
    note: Callable[[BaseModel | None], str],
) -> Mapping[str, Any] | None:
    """Run ``build``, injecting a planned fault first; on out-of-memory, split each step's
    batch into twice as many micro-batches and rebuild.

    Gradient accumulation keeps every step's rows and loss (training.split), so the result is
    the requested config's, up to float rounding, and is stored under its key; the manifest
    records ``oom_micro_batches``. At most $UNLEARNING_AUDIT_OOM_SPLITS (default 3) doublings,
    and never more micro-batches than rows. An OOM that splitting cannot help (one-row
    micro-batches already, or no batch) fails at once as OutOfMemory, with ``note(batch)``:
    the stage's estimate and the settings that would fit. Anything else, and an OOM past the
    doublings, is raised for the task's retries.
    """
    limit = int(os.environ.get(OOM_SPLITS_ENV, "3"))
    current, doublings = batch, 0
    while True:
        try:
            inject_fault(name)
            if current is None:
                return build(store, out)
            meta = dict(build(store, out, current) or {})
            if current is batch:
                return meta
            return {**meta, "oom_micro_batches": current.micro_batches}
        except torch.cuda.OutOfMemoryError as exc:
            if current is None or current.micro_batches >= current.batch_size:
                raise OutOfMemory(f"{name}: {exc}; splitting cannot help: {note(current)}") from exc
            if doublings >= limit:
                raise
        parts = min(2 * current.micro_batches, current.batch_size)
        get_run_logger().warning(
            "%s: out of memory with %d micro-batch(es) of a %d-row batch; rebuilding with %d",
            name,
            current.micro_batches,
            current.batch_size,
            parts,
        )
        current, doublings = current.model_copy(update={"micro_batches": parts}), doublings + 1
        _release_memory(out)


def _memory_note(
    store: Store,
    stage: str,
    inputs: Mapping[str, Any],
    config: Any,
    requested: BaseModel | None,
    batch: BaseModel | None,
) -> str:
    """The stage's memory estimate (plan.stage_note) for an out-of-memory message, with its
    training config ``batch`` (``requested``, maybe split into more micro-batches), read from
    its checkpoint's config.json and its data's longest rendered row; what prevents one, if
    anything does (a stage without a checkpoint, a config that cannot be read)."""
    from transformers import AutoTokenizer

    checkpoint, data_ref = inputs.get("checkpoint"), inputs.get("data")
    if not isinstance(config, Mapping) or checkpoint is None or data_ref is None:
        return f"no memory estimate for the {stage} stage"
    try:
        folder = store.local_dir(checkpoint)
        shape = plan.shape_of_folder(folder)
        fmt = renderer_for(store, data_ref, AutoTokenizer.from_pretrained(folder))
        seq = plan.sequence_length(fmt, load_sets(store, data_ref))
        budget = plan.device_budget("auto")
        return plan.stage_note(stage, dict(config), batch, shape, seq, budget, requested)
    except (ValueError, OSError) as exc:
        return f"no memory estimate ({exc})"


def _release_memory(out: Path) -> None:
    """Free what a failed attempt held, and empty its output folder for the next one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for path in out.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def inject_fault(name: str) -> None:
    """Test-only: fail this build of stage ``name`` if the fault file plans it.

    $UNLEARNING_AUDIT_FAULTS names a JSON file of planned faults per stage (task name), e.g.
    ``{"relearn": ["oom", "error"]}``: each build of that stage takes the first one left, "oom"
    raising torch.cuda.OutOfMemoryError and "error" a RuntimeError. The file is rewritten under a
    lock, so each planned fault fires once across processes, retries and reruns.
    """
    path = os.environ.get(FAULTS_ENV)
    if not path:
        return
    with open(path, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        plan = json.loads(f.read() or "{}")
        if not plan.get(name):
            return
        kind = plan[name].pop(0)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(plan))
    if kind == "oom":
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected into {name})")
    raise RuntimeError(f"injected failure of {name}")


# -- deployed: stages on their work pools ---------------------------------------------------

_HERE: ContextVar[set[str] | None] = ContextVar("unlearning_audit_dispatched", default=None)
"""Inside a stage or group flow run on its pool (flows/dispatch.py): the keys its stages
computed (not served from the store); every stage called there runs there. None elsewhere."""

_GROUP: ContextVar[_Group | None] = ContextVar("unlearning_audit_group", default=None)
"""The outermost stage group this call runs in, in the process that called it; None outside."""

GROUP_MARK = "__stage_group__"
"""The attribute that marks a stage group: the only functions besides stage tasks that the
`stage` flow runs by name."""


@contextlib.contextmanager
def running_here() -> Iterator[set[str]]:
    """Run a dispatched stage or group in this flow run: every stage called in the block runs
    here, none is sent on to a pool; yields the keys of the artifacts the block computes."""
    computed: set[str] = set()
    token = _HERE.set(computed)
    try:
        yield computed
    finally:
        _HERE.reset(token)


def stage_group(name: str) -> Callable[[Callable], Callable]:
    """Decorate a function of the `flows` package whose stages run together: deployed, the
    first of its stages that is not stored and belongs to another pool runs the whole call
    there, as one flow run named ``name`` (formatted with the call's arguments), and every stage
    of the call is then served from the store here.

    A stage called inside the function belongs to the group without any registration; a group
    called inside another one joins it. Locally (or on the pool already) the function just runs.
    Its arguments travel as JSON (to_json): artifact references, configs, states, plain data.
    """

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def grouped(*args, **kwargs):
            if _GROUP.get() is not None or _HERE.get() is not None:
                return fn(*args, **kwargs)
            arguments = inspect.signature(fn).bind(*args, **kwargs).arguments
            token = _GROUP.set(_Group(name.format(**arguments), grouped, arguments))
            try:
                return fn(*args, **kwargs)
            finally:
                _GROUP.reset(token)

        setattr(grouped, GROUP_MARK, True)
        return grouped

    return decorate


def group_ran_on_pool() -> bool:
    """Whether the stage group this call runs in ran on a pool already: its stages are then
    served from the store here, and what the group reports as it goes (the audit's progress)
    was reported there."""
    group = _GROUP.get()
    return group is not None and group.run is not None


@dataclass
class _Group:
    """One call of a stage group in the calling process, and its flow run on a pool once a
    stage of it needed one."""

    name: str
    fn: Callable
    arguments: dict[str, Any]
    pool: str | None = None
    run: FlowRun | None = None
    computed: frozenset[str] = frozenset()
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run_on(self, pool: str, store: Store, key: str) -> None:
        """Run the whole call as one flow run on ``pool``, unless it ran already (a crashed run
        runs again: its stage's task retries it); raise StageRunFailed where that run did not
        store ``key``: it failed at this stage (or before it), or this stage failed inside it."""
        with self.lock:
            if self.run is None or self.run.state.is_crashed():
                self.pool = pool
                self.run = _dispatch(pool, self.fn, self.arguments, self.name)
                if self.run.state.is_completed():
                    self.computed = frozenset(self.run.state.result())
        if store.get(key) is not None:
            return
        ctx = TaskRunContext.get()
        state, run = self.run.state, self.run.name
        where = f"{ctx.task.name}: the {pool} pool's flow run {run!r} of its group {self.name!r}"
        if not state.is_completed():
            raise StageRunFailed(
                f"{where} ended {state.name}: {state.message}", crashed=state.is_crashed()
            )
        why = _failure_in(self.run.id, ctx.task.name) or "see that run's log"
        raise StageRunFailed(f"{where} did not store it: {why}", crashed=False)


def _failure_in(flow_run_id: UUID, task: str) -> str | None:
    """The message of the last failed run of stage ``task`` in a flow run, if any."""
    with get_client(sync_client=True) as client:
        failed = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(
                state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.FAILED]))
            ),
        )
    messages = [t.state.message for t in failed if t.name.rsplit("-", 1)[0] == task]
    return messages[-1] if messages else None


def _remote_pool() -> str | None:
    """The work pool this task must run on, when deployed and not already running there."""
    task_ctx = TaskRunContext.get()
    if os.environ.get(DISPATCH_ENV) != "deployed" or task_ctx is None:
        return None
    if _HERE.get() is not None or not task_ctx.task.fn.__module__.startswith("tasks."):
        return None  # dispatched here already; or not a stage task the stage flow can resolve
    pool = POOLS.get(task_ctx.task.name, "cpu")
    return None if pool == _process_pool() else pool


@functools.cache
def _process_pool() -> str | None:
    """The work pool of the flow run a worker started this process for (also in its subflows:
    a study's audits run where the study runs); None outside a worker."""
    flow_run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    if not flow_run_id:
        return None
    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(flow_run_id)).work_pool_name


def _run_on_pool(pool: str):
    """Run the current task call alone as a `stage` flow run on ``pool``; its state, with the
    artifact reference."""
    ctx = TaskRunContext.get()
    run = _dispatch(pool, ctx.task, ctx.parameters, ctx.task.name)
    state = run.state
    if not state.is_completed():
        raise StageRunFailed(
            f"{ctx.task.name}: stage flow run {run.name!r} on the {pool} pool ended "
            f"{state.name}: {state.message}",
            crashed=state.is_crashed(),
        )
    ref = state.result()
    get_run_logger().info(
        "%s: %s on the %s pool (flow run %s)", ctx.task.name, state.name, pool, run.name
    )
    return Completed(name=state.name, message=f"{state.name} by flow run {run.name}", data=ref)


def _dispatch(pool: str, target, arguments: Mapping[str, Any], name: str) -> FlowRun:
    """Run ``target`` (a stage task or a stage group) with ``arguments`` as a flow run of
    `stage/<pool>-stage` named ``name``; wait for it to end, and return it (with a state)."""
    from prefect.deployments import run_deployment

    fn = inspect.unwrap(getattr(target, "fn", target))  # a task's function, or the group's
    get_run_logger().info(
        "%s: not in the store; running %s on the %s pool", name, fn.__name__, pool
    )
    run = run_deployment(
        f"stage/{pool}-stage",
        parameters={"task": _import_name(fn), "parameters": to_json(arguments)},
        flow_run_name=name,
        poll_interval=float(os.environ.get(POLL_ENV, "2")),
    )
    if run.state is None:
        raise StageRunFailed(f"{name}: flow run {run.name!r} on the {pool} pool has no state", True)
    return run


def _import_name(fn: Callable) -> str:
    """``module:function`` of a function of this repository as the stage flow imports it: its
    module named by its file's place in the repository (a deployed flow's own file is loaded
    under another module name, e.g. `audit` for flows/audit.py)."""
    path = Path(inspect.getfile(fn)).resolve().relative_to(Path(__file__).resolve().parents[1])
    return f"{'.'.join(path.with_suffix('').parts)}:{fn.__name__}"


MODEL_TAG = "__model__"


def to_json(obj: Any) -> Any:
    """What a stage or group call's arguments travel to their pool as: JSON, where a pydantic
    model of this package (an artifact reference, a config) is tagged with its class, so that
    from_json gives it back as itself wherever it sits (in a dict of runs, a candidate), and a
    stage's state (a stage served from the store returns one) is its result."""
    if isinstance(obj, State):
        return to_json(obj.result())
    if isinstance(obj, BaseModel):
        cls = type(obj)
        return {
            MODEL_TAG: f"{cls.__module__}:{cls.__qualname__}",
            "fields": obj.model_dump(mode="json"),
        }
    if isinstance(obj, Mapping):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json(v) for v in obj]
    return to_jsonable_python(obj)


def from_json(obj: Any) -> Any:
    """The arguments to_json made, back as they were (tuples as lists); only models of the
    `unlearning_audit` package are built."""
    if isinstance(obj, dict) and set(obj) == {MODEL_TAG, "fields"}:
        module, _, name = obj[MODEL_TAG].partition(":")
        if not module.startswith("unlearning_audit."):
            raise ValueError(f"not a model of this package: {obj[MODEL_TAG]!r}")
        cls = getattr(importlib.import_module(module), name, None)
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            raise ValueError(f"not a model of this package: {obj[MODEL_TAG]!r}")
        return cls.model_validate(obj["fields"])
    if isinstance(obj, dict):
        return {k: from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    return obj


# -- loading inputs -------------------------------------------------------------------------


def load_model(
    store: Store, ref: ArtifactRef, device, *, trust_remote_code: bool = False, gpus: int = 1
):
    """The model and tokenizer of a checkpoint artifact (already checked when fetched), or of
    an adapter artifact: its base checkpoint (the stage input it was trained from, which the
    artifact's key derives from) with the adapter merged in; split over ``gpus`` GPUs for
    inference where that is more than one (checkpoints.load).

    The checkpoint's own model code runs only with ``trust_remote_code``, which comes from the
    current run's parameters (the stage task's, passed by the flow from the audit's), never
    from the store: a manifest's meta is covered by no hash, and whoever can write to a shared
    store could otherwise make a later audit run code it was not allowed to."""
    folder = store.local_dir(ref)
    base = None
    if adapters.is_adapter(folder):
        base = ArtifactRef.model_validate_json((folder / BASE).read_bytes())
        if base.hash != store.manifest(ref.key)["meta"]["inputs"]["checkpoint"]:
            raise CorruptArtifact(
                f"{ref.key}: {BASE} names another base than the one it was trained on"
            )
    return load_folder(store, folder, base, device, trust_remote_code=trust_remote_code, gpus=gpus)


def load_folder(
    store: Store,
    folder: Path,
    base: ArtifactRef | None,
    device,
    *,
    trust_remote_code: bool = False,
    gpus: int = 1,
):
    """The model and tokenizer saved in ``folder``: a checkpoint, or an adapter whose stored
    base checkpoint ``base`` it is merged into (see load_model)."""
    if not adapters.is_adapter(folder):
        return checkpoints.load(folder, device, trust_remote_code=trust_remote_code, gpus=gpus)
    model, tokenizer = load_model(
        store, base, device, trust_remote_code=trust_remote_code, gpus=gpus
    )
    return adapters.apply(model, folder), tokenizer


BASE = "base.json"
"""The checkpoint an adapter artifact adapts: the training stage's input (its key and hash; the
hash is also the artifact's recorded input, which derives its key)."""


def save_trained(
    model,
    tokenizer,
    adapter: adapters.Adapter | None,
    base: ArtifactRef,
    out: Path,
    state: dict | None = None,
) -> None:
    """Store what a training stage made from ``base``: its LoRA adapter alone where it trained
    one (loading merges it into ``base``), else the whole checkpoint (``state``: its full state
    dict, gathered from the ranks of several GPUs)."""
    if adapter is None:
        checkpoints.save(model, tokenizer, out, state)
        return
    adapter.save(out)
    (out / BASE).write_text(base.model_dump_json())


def load_sets(store: Store, ref: ArtifactRef) -> dict[str, list[dict]]:
    """The probe sets of a data artifact."""
    return data.read_sets(store.local_dir(ref))


def load_inputs(
    store: Store,
    checkpoint: ArtifactRef,
    data_ref: ArtifactRef,
    device,
    *,
    trust_remote_code: bool = False,
    gpus: int = 1,
):
    """What a model stage starts from: the model, its tokenizer in the audit's prompt format
    (one rendering for every stage), the probe sets, and the data's generation cap. The
    checkpoint's own model code runs only with ``trust_remote_code``; an inference stage's
    model is split over ``gpus`` GPUs (see load_model)."""
    model, tokenizer = load_model(
        store, checkpoint, device, trust_remote_code=trust_remote_code, gpus=gpus
    )
    fmt = renderer_for(store, data_ref, tokenizer)
    cap = store.read_json(data_ref, data.FORMAT)["max_new_tokens"]
    return model, fmt, load_sets(store, data_ref), cap


def renderer_for(store: Store, data_ref: ArtifactRef, tokenizer) -> prompts.Renderer:
    """The audit's prompt format (the data artifact's) for ``tokenizer``."""
    spec = store.read_json(data_ref, data.FORMAT)
    return prompts.renderer(tokenizer, spec["prompt_format"], spec["separator"])


def on_gpus(
    gpus: int, device: str, build: Callable[..., Mapping[str, Any]], store: Store, *args
) -> dict:
    """``build(store, *args)``, a training stage's build: here with one GPU; with more, in
    ``gpus`` processes, one per GPU, that shard the model (distributed.launch; rank 0's meta),
    after the artifacts among ``args`` are in this machine's cache (a remote store's are
    downloaded once, not by every rank). The manifest's meta records the GPUs; the stage's key
    does not hold them: they change its result by float rounding only."""
    if gpus == 1:
        meta = build(store, *args)
    else:  # checked by preflight where the flow runs; here, on the machine that trains
        resolved = runtime.resolve_device(device)
        if problems := distributed.gpu_problems(gpus, resolved):
            raise ValueError("; ".join(problems))
        for ref in args:
            if isinstance(ref, ArtifactRef):
                store.local_dir(ref)
        meta = distributed.launch(build, gpus, resolved, store, *args)
    return {**meta, "gpus": gpus}


MEMORY_LOG = logging.getLogger("unlearning_audit.memory")
"""Where the memory settings a stage chose for itself are explained; under the package's name,
so that Prefect sends it to the run's log (runtime.PREFECT_ENV's extra loggers)."""


def shape_or_warn(model, fallback: str) -> plan.ModelShape | None:
    """The loaded ``model``'s shape for a stage's own memory settings (plan.model_shape), or
    None where the estimator cannot read it (e.g. its own code's config), with a warning saying
    the stage goes on with ``fallback``."""
    try:
        return plan.model_shape(model)
    except (AttributeError, TypeError, ValueError) as exc:
        MEMORY_LOG.warning("%s: the estimator cannot read the model (%s)", fallback, exc)
        return None


def checkpointing_here(
    setting: Checkpointing,
    budget: int | None,
    loaded: tuple[Any, prompts.Renderer, dict[str, list[dict]]],
    estimate: Callable[[plan.ModelShape, BaseModel, int, plan.Compute], plan.StageEstimate],
    config: BaseModel,
    compute: plan.Compute,
) -> bool:
    """Whether a training stage checkpoints its activations, decided where it runs: as
    ``setting`` says where it is a bool; under auto by plan.use_checkpointing, on ``budget``
    (the memory of the device it runs on: plan.device_budget), with the stage's estimate
    (plan.unlearn_estimate or plan.relearn_estimate of its training ``config``, computing as
    ``compute`` says) for the ``loaded`` model's shape and the longest row of its sets
    rendered by its renderer. Without a budget auto is off, and nothing is measured; where the
    estimator cannot read the model (e.g. its own code's config) it is off too, with a warning:
    an out-of-memory error then splits the batch."""
    if setting != "auto" or budget is None:
        return setting is True
    model, fmt, sets = loaded
    shape = shape_or_warn(model, "gradient checkpointing off")
    if shape is None:
        return False
    seq = plan.sequence_length(fmt, sets)

    def ran(on: bool) -> plan.StageEstimate:
        return estimate(shape, config, seq, replace(compute, checkpointing=on))

    return plan.use_checkpointing(setting, shape, budget, ran)


def write_json(path: Path, obj: Any) -> None:
    """Write an indented JSON file."""
    path.write_text(json.dumps(obj, indent=1, default=float))
