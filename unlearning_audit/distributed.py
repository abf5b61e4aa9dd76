"""Several GPUs for one stage: processes with a process group, sharded training, a full
checkpoint back on one process.

A training stage given ``gpus`` > 1 runs its build in that many processes (:func:`launch`), one
per GPU, and :func:`training.fit` shards the model across them with torch's FSDP2
(:func:`shard`): each decoder block's parameters, gradients and AdamW state are split over the
ranks, and gathered block by block for its forward and backward. The data is split too: every
rank takes its share of each step's batch (training.share), which carries the whole batch's
normalisers, so the ranks' gradients add up to the whole batch's; FSDP's reduction of them is
therefore a sum, not its default mean. After training, :func:`full_state_dict` gathers the
weights on rank 0, which writes the checkpoint.

One stage never spans machines: several machines serve one audit as several workers sharing
its store. The ranks meet on a localhost port (a TCP store the launching process holds). NCCL
on CUDA; gloo on the CPU, which only tests use (see ``CPU_ENV``).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from . import layers

CPU_ENV = "UNLEARNING_AUDIT_GLOO_ON_CPU"
"""Test-only: set to 1 to let a stage run on several CPU processes (gloo) when its device is the
CPU; without it, gpus > 1 on the CPU is refused (preflight)."""

HOST = "127.0.0.1"
TIMEOUT = timedelta(minutes=30)  # a collective waiting this long on a rank ends with an error
RESULT = "result.pkl"


def backend(device: torch.device) -> str:
    """The collective backend of a stage computing on ``device``: NCCL on CUDA, else gloo."""
    return "nccl" if device.type == "cuda" else "gloo"


def launch(fn: Callable[..., Any], world: int, device: torch.device, *args: Any) -> Any:
    """``fn(*args)`` in ``world`` processes joined in one process group; rank 0's return value.

    The processes are spawned (fresh interpreters: ``fn`` and ``args`` must pickle, and the
    program's main module must import without running, its work behind ``if __name__ ==
    "__main__"`` as in a console script), each on its own GPU where ``device`` is CUDA
    (rank r on cuda:r, its current device, so "cuda" means it). An exception in a rank ends
    the others and is raised here as itself, its type kept (a ValueError stays bad input, an
    out-of-memory error stays one), with a note naming the rank and holding its traceback; a
    rank that dies without one (killed, crashed) raises a RuntimeError naming it. No process
    outlives this call, also when it is interrupted; a launching process killed outright
    leaves its ranks a second to end themselves (:func:`_exit_with`).
    """
    store = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    with tempfile.TemporaryDirectory(prefix="ranks-") as folder:
        context = mp.start_processes(
            _rank_main,
            (fn, args, world, store.port, backend(device), folder),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        try:
            while not context.join():
                pass
        except ProcessException as failure:
            raise _rank_error(Path(folder), failure, world) from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
                process.join()
        return pickle.loads((Path(folder) / RESULT).read_bytes())


def _rank_main(rank: int, fn, args, world: int, port: int, kind: str, folder: str) -> None:
    """One rank: join the group, run ``fn``, and leave rank 0's result or any rank's
    exception (with its traceback) in ``folder`` for :func:`launch`."""
    _exit_with(os.getppid())
    try:
        if kind == "nccl":
            torch.cuda.set_device(rank)
        store = dist.TCPStore(HOST, port, is_master=False, timeout=TIMEOUT)
        dist.init_process_group(kind, store=store, rank=rank, world_size=world, timeout=TIMEOUT)
        result = fn(*args)
        # every rank done before any leaves: a rank that tears its connections down while a
        # peer still finishes its last collective makes gloo abort that peer (seen under load)
        dist.barrier()
    except BaseException as exc:  # the group is left as it is: its peers may be stuck in it
        _write_error(Path(folder) / f"rank{rank}.err", exc)
        raise
    dist.destroy_process_group()
    if rank == 0:
        (Path(folder) / RESULT).write_bytes(pickle.dumps(result))


def _exit_with(parent: int) -> None:
    """End this process within a second of ``parent``'s end: a launching process killed
    outright (SIGKILL, or an exit that runs no ``finally``) cannot end its ranks itself, and
    a rank left behind would hold its GPU, or wait in a collective, for ever."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-launcher").start()


def _write_error(path: Path, exc: BaseException) -> None:
    """Pickle ``exc`` and its traceback to ``path``; one that does not pickle as a
    RuntimeError with its type and message."""
    told = "".join(traceback.format_exception(exc))
    try:
        payload = pickle.dumps((exc, told))
    except Exception:
        payload = pickle.dumps((RuntimeError(f"{type(exc).__name__}: {exc}"), told))
    path.write_bytes(payload)


def _rank_error(folder: Path, failure: ProcessException, world: int) -> BaseException:
    """The exception the failed rank left, noted with its rank and traceback, else a
    RuntimeError naming the rank and how it ended (its traceback, where torch kept one)."""
    rank = failure.error_index
    path = folder / f"rank{rank}.err"
    try:
        exc, told = pickle.loads(path.read_bytes())
    except Exception:  # none left (killed, crashed), or one that does not unpickle
        return RuntimeError(f"rank {rank} of {world} processes failed: {failure}")
    note = f"raised in rank {rank} of {world} processes:\n{told}"
    exc.__notes__ = [*getattr(exc, "__notes__", ()), note]  # add_note, in Python 3.10 too
    return exc


def ranks() -> tuple[int, int]:
    """This process's rank and the number of ranks: (0, 1) outside a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shard(model):
    """``model`` sharded over the process group's ranks (FSDP2: each decoder block, then the
    rest at the root), its gradients reduced as a sum; the model itself outside a group.

    Sharding moves each rank's shards to its device and replaces the parameters by DTensors:
    from here on the model runs only in step on every rank, and its weights leave it through
    :func:`full_state_dict`."""
    if ranks()[1] == 1:
        return model
    from torch.distributed.fsdp import FSDPModule, fully_shard

    _, blocks = layers.decoder_blocks(model)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # the ranks' gradients are parts of a sum
            # a plain SUM: else fp32 and bf16 reduce by PREMUL_SUM(1 / factor), which gloo lacks
            module.set_force_sum_reduction_for_comms(True)
    return model


def total(value: float, device: torch.device) -> float:
    """The sum of ``value`` over the ranks (itself outside a process group)."""
    if ranks()[1] == 1:
        return value
    tensor = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item()


def agree(decision: bool, device: torch.device) -> bool:
    """Rank 0's ``decision``, on every rank: ranks that decide apart (an early stop) would
    wait on each other's collectives for ever."""
    if ranks()[1] == 1:
        return decision
    flag = torch.tensor(int(decision), device=device)
    dist.broadcast(flag, 0)
    return bool(flag.item())


def full_state_dict(model) -> dict[str, torch.Tensor] | None:
    """A sharded model's whole state dict on rank 0, in CPU memory ({} on the other ranks;
    every rank must call it); None for a model that is not sharded (save it as it is)."""
    if ranks()[1] == 1:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def gpu_problems(gpus: int, device: torch.device) -> list[str]:
    """Why a stage computing on ``device`` cannot use ``gpus`` GPUs (none for one): a device
    naming one GPU, more GPUs than torch sees, or a device that is not CUDA (the CPU is
    allowed with ``CPU_ENV``, for tests)."""
    if gpus == 1:
        return []
    if device.type == "cuda":
        if device.index is not None:
            return [
                f"device: {str(device)!r} names one GPU, but gpus is {gpus}: give 'cuda' or "
                "'auto' (a stage uses the first gpus visible GPUs; CUDA_VISIBLE_DEVICES "
                "chooses them)"
            ]
        count = torch.cuda.device_count()
        if gpus > count:
            return [f"gpus: {gpus} were asked for, but torch sees {count} CUDA device(s)"]
        return []
    if device.type == "cpu" and os.environ.get(CPU_ENV) == "1":
        return []
    return [f"gpus: {gpus} were asked for, but the device is {device.type}, not CUDA GPUs"]
