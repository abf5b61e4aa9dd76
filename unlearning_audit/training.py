"""The one training loop every stage shares (pretraining, unlearning, relearning), and the
answer-token log-likelihoods every loss is built from."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.nn.functional as F

from . import distributed
from .data import IGNORE

Batch = dict[str, torch.Tensor]


class Diverged(ValueError):
    """Training produced a loss that is not a finite number: the weights are NaN or infinite
    from here on, so nothing trained further may be stored. A ValueError: rerunning with the
    same settings fails the same way (a lower learning rate is the cure)."""


def default_lr(model) -> float:
    """The learning rate of a stage given none: 1e-5 at 7B parameters (TOFU's unlearning and
    fine-tuning rate), scaled by 1/sqrt(size) to smaller models, at most 1e-3 (2.6e-5 at 1B,
    8.4e-5 at 100M). A rate that suits the tiny embedded model wrecks a 7B one."""
    size = sum(p.numel() for p in model.parameters())
    return min(1e-3, 1e-5 * (7e9 / size) ** 0.5)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor of a batch to ``device``."""
    return {k: v.to(device) for k, v in batch.items()}


def token_logprobs(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the label tokens, (b, t-1), zero off the answer, and the answer mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logp = -F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=IGNORE, reduction="none"
    )
    mask = labels != IGNORE
    return logp * mask, mask


def sequence_logprob(model, batch: Batch) -> torch.Tensor:
    """log p(answer | question) per sample: the sum over its answer tokens, shape (b,)."""
    logp, _ = token_logprobs(model, batch)
    return logp.sum(dim=1)


def mean_nll(model, batch: Batch) -> torch.Tensor:
    """Mean negative log-likelihood per answer token over the (whole) batch."""
    logp, mask = token_logprobs(model, batch)
    return -logp.sum() / answer_tokens(batch, mask)


def answer_tokens(batch: Batch, mask: torch.Tensor) -> torch.Tensor:
    """What a per-answer-token mean divides by: the answer tokens of the whole batch that
    ``batch`` is a part of (see :func:`split`), else its own (at least 1)."""
    return batch.get("answer_tokens", mask.sum()).clamp(min=1)


def batch_rows(batch: Batch) -> int | torch.Tensor:
    """What a per-row mean divides by: the rows of the whole batch ``batch`` is a part of."""
    return batch.get("rows", batch["input_ids"].shape[0])


def split(batch: Batch | dict[str, Batch], parts: int) -> list:
    """``batch`` (or a dict of paired batches, such as forget and retain) cut into ``parts``
    micro-batches of consecutive rows, for gradient accumulation.

    Each part carries the whole batch's normalisers (its answer tokens and rows), so the means
    in :func:`mean_nll` and the unlearning losses divide by the whole batch's counts and the
    parts' losses and gradients add up to the whole batch's, up to float rounding.
    """
    if parts == 1:
        return [batch]
    if "input_ids" not in batch:
        pieces = {name: split(sub, parts) for name, sub in batch.items()}
        groups = zip(*pieces.values(), strict=True)
        return [dict(zip(pieces, group, strict=True)) for group in groups]
    rows = batch["input_ids"].shape[0]
    if not 1 <= parts <= rows:
        raise ValueError(f"cannot split a batch of {rows} rows into {parts} micro-batches")
    whole = {
        "answer_tokens": (batch["labels"][:, 1:] != IGNORE).sum(),
        "rows": torch.tensor(rows, device=batch["input_ids"].device),
    }
    chunks = {key: value.tensor_split(parts) for key, value in batch.items()}
    return [{key: chunks[key][i] for key in batch} | whole for i in range(parts)]


def share(batch: Batch | dict[str, Batch], micro_batches: int) -> list:
    """This rank's ``micro_batches`` parts of a step's batch: with R ranks (distributed.ranks)
    the batch is cut into R * ``micro_batches`` parts (:func:`split`, so every part carries the
    whole batch's normalisers and the ranks' losses and gradients add up to the whole batch's),
    and rank r takes the r-th run of them; outside a process group, all of them."""
    rank, world = distributed.ranks()
    return split(batch, micro_batches * world)[rank * micro_batches : (rank + 1) * micro_batches]


def weight_dtype(own: torch.dtype, precision: str, trains: bool = True) -> torch.dtype:
    """The dtype a weight stored in ``own`` trains in, and so its AdamW state: bf16 for pure
    bf16, else at least fp32 (bf16-mixed's master weights; a float64 weight stays float64).
    A frozen weight (LoRA's base, a head-only edit's body) stays in ``own`` under bf16-mixed,
    where autocast computes with it as it is: fp32 master copies are for updates."""
    if not trains and precision == "bf16-mixed":
        return own
    return torch.bfloat16 if precision == "bf16" else torch.promote_types(own, torch.float32)


def _set_checkpointing(model, on: bool) -> None:
    """Switch non-reentrant gradient checkpointing on or off, under transformers 5's name
    (activation checkpointing) where the model has it, else 4's."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            kwargs = {"activation_checkpointing_kwargs": {"use_reentrant": False}}
            model.activation_checkpointing_enable(**kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def check_checkpointing(model) -> None:
    """Refuse gradient checkpointing for a model whose code does not support it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        name = type(model).__name__
        raise ValueError(f"{name} does not support gradient checkpointing: leave it off")


def fit(
    model,
    loss_fn: Callable[[object, dict], torch.Tensor],
    batches: Iterator[dict],
    steps: int,
    lr: float,
    stop: Callable[[int], bool] | None = None,
    grad_clip: float = 1.0,
    warmup: int = 0,
    progress: Callable[[int, int], None] | None = None,
    micro_batches: int = 1,
    precision: str = "fp32",
    checkpointing: bool = False,
) -> list[float]:
    """AdamW on ``loss_fn(model, batch)`` for up to ``steps`` steps; returns the loss per step.

    The learning rate rises linearly over ``warmup`` steps, then stays at ``lr``. ``stop(step)``
    is called after each step (1-based) and ends training when it returns True. ``progress(step,
    steps)`` is called after each step too, for progress bars (an early stop ends below steps).
    ``micro_batches`` > 1 accumulates each step's gradient over that many parts of its batch
    (:func:`split`): the same step in less memory.

    ``precision`` (fp32, bf16-mixed or bf16; runtime.resolve_precision resolves auto) sets the
    dtype the weights train in (:func:`weight_dtype`); bf16-mixed computes each loss under bf16
    autocast. Pure bf16 loses most updates: at lr 1e-5 a step moves a weight of 0.02 by less
    than half its bf16 spacing, so it rounds back. ``stop`` and ``progress`` see the weights in
    the training dtype; after training every parameter is back in its own dtype (a bf16
    checkpoint is saved as bf16).

    ``checkpointing`` recomputes each block's activations in the backward pass (transformers'
    gradient checkpointing, non-reentrant): the same gradients in less activation memory.

    In a process group (distributed.launch), every rank calls fit with the same batches: the
    model is sharded over the ranks (distributed.shard), each rank trains on its share of each
    step (:func:`share`), the losses are the ranks' sums and rank 0 decides ``stop``.
    """
    own = {name: p.dtype for name, p in model.named_parameters()}
    trains = {name: p.requires_grad for name, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    autocast = partial(
        torch.autocast,
        device.type,
        dtype=torch.bfloat16,
        enabled=precision == "bf16-mixed",
    )
    losses = []
    if checkpointing:
        check_checkpointing(model)
        _set_checkpointing(model, True)
    try:
        model = distributed.shard(model)  # first: only each rank's shard changes dtype
        _cast(model, lambda name: weight_dtype(own[name], precision, trains[name]))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: min(1.0, (i + 1) / warmup) if warmup else 1.0
        )
        model.train()
        for step in range(1, steps + 1):
            loss = 0.0
            for part in share(next(batches), micro_batches):
                with autocast():
                    part_loss = loss_fn(model, part)
                part_loss.backward()
                loss += part_loss.item()
            loss = distributed.total(loss, device)
            if not math.isfinite(loss):
                raise Diverged(
                    f"training diverged: the loss is {loss} at step {step} of {steps} "
                    f"(learning rate {lr:g}); lower the learning rate"
                )
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            if progress is not None:
                progress(step, steps)
            if stop is not None and distributed.agree(stop(step), device):
                break
    finally:
        _cast(model, own.__getitem__)
        if checkpointing:
            _set_checkpointing(model, False)
    model.eval()
    return losses


def _cast(model, dtype_of: Callable[[str], torch.dtype]) -> None:
    """Each parameter of ``model`` in ``dtype_of(its name)``. A sharded one (a DTensor, not a
    plain tensor) is swapped whole, its data cannot be set: FSDP takes up the swapped
    parameters at its first forward, and after one, a model cast so serves only its state dict
    (distributed.full_state_dict), no longer a forward."""
    for name, p in model.named_parameters():
        dtype = dtype_of(name)
        if type(p.data) is torch.Tensor:
            p.data = p.data.to(dtype)
        elif p.dtype != dtype:
            torch.utils.swap_tensors(p, torch.nn.Parameter(p.to(dtype), p.requires_grad))
