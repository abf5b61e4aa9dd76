"""Several processes for one stage (distributed.py): two gloo processes on the CPU train a tiny
Llama with FSDP2 as one process does (up to rounding), and a rank's failure reaches the caller
with its rank named and no process left behind.

Splitting a model over several GPUs for inference (checkpoints.load with gpus > 1) needs GPUs:
it is not tested here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from unlearning_audit import distributed, training
from unlearning_audit.data import IGNORE

CPU = torch.device("cpu")


def _model(dtype: torch.dtype):
    """A tiny Llama in ``dtype``, the same on every rank (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # only the ranks that train need it

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype)


def _batches(steps: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` batches of 4 rows with answers of different lengths and right padding, so
    that each rank's share has its own answer-token count (the normalisers must be the whole
    batch's for the ranks' losses to add up)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        ids = torch.randint(1, 40, (4, 10), generator=g)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        labels[:, :4] = IGNORE  # the prompt
        for row, pad in enumerate((0, 3, 1, 5)):
            if pad:
                mask[row, -pad:] = 0
                labels[row, -pad:] = IGNORE
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


RUNS = {"NLL": (1.0, torch.bfloat16), "GA": (-1.0, torch.float64)}
"""Plain NLL on a bf16 model (trained in float32, fp32 precision: training.weight_dtype),
gradient ascent (minus it) on a float64 one: FSDP reduces the two training dtypes by different
collectives, and the bf16 model is cast to float32 and back while sharded."""


def _train(steps: int = 3) -> dict[str, tuple]:
    """Train the tiny model on the fixed batches in each of RUNS; per run, the losses per step
    and the final weights (rank 0's whole state dict in a group); under "gradient", the first
    batch's gradient at the initial weights. All in one call: each launch costs the ranks'
    start (seconds)."""
    torch.set_num_threads(1)
    runs = {name: _train_with(sign, dtype, steps) for name, (sign, dtype) in RUNS.items()}
    return {**runs, "gradient": _gradient()}


def _gradient() -> dict[str, torch.Tensor]:
    """The float64 model's NLL gradient on the first batch, whole (as fit shards the model and
    the batch: each rank's share's gradient, reduced by FSDP)."""
    from torch.distributed.tensor import DTensor

    model = distributed.shard(_model(torch.float64))
    for part in training.share(_batches(1)[0], 1):
        training.mean_nll(model, part).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return {n: g.full_tensor() if isinstance(g, DTensor) else g for n, g in grads.items()}


def _train_with(
    sign: float, dtype: torch.dtype, steps: int
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One training run of :func:`_train`, the loss times ``sign``."""
    model = _model(dtype)
    losses = training.fit(
        model,
        lambda m, b: sign * training.mean_nll(m, b),
        iter(_batches(steps)),
        steps,
        lr=1e-2,
        grad_clip=0.5,
    )
    state = distributed.full_state_dict(model)
    return losses, state if state is not None else model.state_dict()


def test_two_processes_train_as_one():
    """Two ranks, each on half of every batch with FSDP2 shards and summed gradients, give the
    losses, gradients and weights of one process on the whole batches, up to float32 rounding (1e-7
    relative): training.token_logprobs takes the cross-entropy in float32, a float64 model's
    too, so the halves' sums and one process's whole-batch sum round apart there."""
    one = _train()
    two = distributed.launch(_train, 2, CPU)
    for method, (_sign, dtype) in RUNS.items():
        (one_losses, one_state), (two_losses, two_state) = one[method], two[method]
        assert len(two_losses) == 3
        assert two_losses == pytest.approx(one_losses, rel=1e-6), method
        assert one_losses[-1] != pytest.approx(one_losses[0], rel=1e-3)  # it did train
        assert two_state.keys() == one_state.keys()
        for name, weight in one_state.items():
            assert two_state[name].dtype == dtype  # back in the model's own
            if dtype == torch.float64:
                torch.testing.assert_close(two_state[name], weight, rtol=1e-6, atol=1e-8)
            else:  # float32 weights a few 1e-6 apart may round to neighbouring bf16 values
                torch.testing.assert_close(two_state[name], weight, rtol=8e-3, atol=1e-4)
    # the gradient itself: FSDP's default reduction, the mean, would halve it, and AdamW,
    # dividing each gradient by its size, would hide that from the weights
    for name, grad in one["gradient"].items():
        torch.testing.assert_close(two["gradient"][name], grad, rtol=1e-6, atol=1e-10)


def _fail_in_rank_one(pid_folder: str, how: str) -> None:
    """Record this rank's pid; rank 1 raises (``how`` "raise") or dies without a word ("exit")
    while rank 0 waits in a collective for it."""
    rank = dist.get_rank()
    with open(os.path.join(pid_folder, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    dist.barrier()  # both pids written
    if rank == 1 and how == "raise":
        raise ValueError("bad input seen by one rank")
    if rank == 1:
        os._exit(3)
    dist.barrier()


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_rank_failure_is_raised_with_its_rank_and_ends_every_rank(tmp_path, how):
    """Rank 1's ValueError reaches the caller as a ValueError (bad input stays bad input) with
    a note naming rank 1; a rank that exits without one is named in a RuntimeError. Rank 0,
    stuck waiting for it, is ended: no process is left."""
    if how == "raise":
        with pytest.raises(ValueError, match="bad input seen by one rank") as raised:
            distributed.launch(_fail_in_rank_one, 2, CPU, str(tmp_path), how)
        assert "raised in rank 1 of 2 processes" in "".join(raised.value.__notes__)
    else:
        message = "rank 1 of 2 processes failed: process 1 terminated with exit code 3"
        with pytest.raises(RuntimeError, match=message):
            distributed.launch(_fail_in_rank_one, 2, CPU, str(tmp_path), how)
    pids = [int((tmp_path / f"{rank}.pid").read_text()) for rank in range(2)]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _wait_for_ever(pid_folder: str) -> None:
    """Record this rank's pid, then wait in a collective that never completes (each rank
    receives from the other), in native code, where the SIGINT torch's spawn asks for at its
    parent's death is not seen."""
    rank = dist.get_rank()
    with open(os.path.join(pid_folder, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    dist.recv(torch.zeros(1), src=1 - rank)


LAUNCHER = """
import sys
sys.path[:0] = sys.argv[2:]
import torch
import test_distributed
from unlearning_audit import distributed
if __name__ == "__main__":
    distributed.launch(test_distributed._wait_for_ever, 2, torch.device("cpu"), sys.argv[1])
"""


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (one nobody reaped yet is dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_ranks_end_when_their_launcher_is_killed(tmp_path):
    """A launching process killed outright (SIGKILL: no finally runs) cannot end its ranks:
    they end themselves within seconds instead of holding their GPUs."""
    here = Path(__file__).parent
    paths = [str(here.parent), str(here)]
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path), *paths])
    pid_files = [tmp_path / f"{rank}.pid" for rank in range(2)]
    deadline = time.monotonic() + 120
    while not all(f.exists() and f.read_text() for f in pid_files):
        assert launcher.poll() is None and time.monotonic() < deadline, "the ranks never started"
        time.sleep(0.2)
    pids = [int(f.read_text()) for f in pid_files]
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 20
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(pid) for pid in pids)


def test_gpus_a_stage_cannot_use_are_named():
    """One GPU is always fine; several need CUDA devices that torch sees, all of them (not a
    device naming one); the CPU only with the test switch."""
    assert distributed.gpu_problems(1, CPU) == []
    (problem,) = distributed.gpu_problems(2, torch.device("cuda:1"))
    assert problem.startswith("device: 'cuda:1' names one GPU, but gpus is 2")
    count = torch.cuda.device_count()
    more = max(count + 1, 2)
    (problem,) = distributed.gpu_problems(more, torch.device("cuda"))
    assert problem == f"gpus: {more} were asked for, but torch sees {count} CUDA device(s)"
    (problem,) = distributed.gpu_problems(2, CPU)
    assert problem == "gpus: 2 were asked for, but the device is cpu, not CUDA GPUs"


def test_preflight_refuses_gpus_before_any_stage(capsys, tmp_path, monkeypatch):
    """--gpus 2 on the CPU is refused up front; with the test switch, the CPU passes but a
    batch too small to give each of 4 GPUs a row per micro-batch is named."""
    from unlearning_audit import cli

    store = str(tmp_path / "store")
    code = cli.main(["audit", "--original", "embedded", "--gpus", "2", "--store", store])
    err = capsys.readouterr().err
    assert code == 2 and "gpus: 2 were asked for, but the device is cpu" in err, err
    monkeypatch.setenv(distributed.CPU_ENV, "1")
    config = tmp_path / "audit.json"
    config.write_text('{"methods": [{"method": "GA", "lr": 0.001, "batch_size": 2}]}')
    argv = ["audit", "--original", "embedded", "--config", str(config), "--store", store]
    code = cli.main([*argv, "--device", "cpu", "--gpus", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "steps=60: batch_size 2 cannot be shared by 4 GPUs in 1 micro" in err, err
    assert "gpus: 4 were asked for" not in err


def test_a_model_split_off_its_gpus_is_refused():
    """Splitting for inference (checkpoints.load with gpus > 1) is for CUDA only, and a split
    that put modules on the CPU or disk (where accelerate puts what does not fit) is a problem
    naming them. The split itself needs GPUs: not run here."""
    from unlearning_audit import checkpoints

    assert checkpoints.split_placement(CPU, 2) == {}
    model = _model(torch.float32)
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1, "lm_head": 1}
    assert checkpoints._offloaded(model, 2) == []
    model.hf_device_map |= {"model.layers": "cpu", "lm_head": "disk"}
    (problem,) = checkpoints._offloaded(model, 2)
    assert problem.startswith("the model does not fit in the free memory of 2 GPUs: lm_head; ")
    assert "model.layers would run from host memory or disk" in problem
