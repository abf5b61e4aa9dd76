"""The one training loop every stage shares (pretraining, unlearning, relearning), and the
answer-token log-likelihoods every loss is built from."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from .data import IGNORE

Batch = dict[str, torch.Tensor]


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
    """Mean negative log-likelihood per answer token over the batch."""
    logp, mask = token_logprobs(model, batch)
    return -logp.sum() / mask.sum().clamp(min=1)


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
) -> list[float]:
    """AdamW on ``loss_fn(model, batch)`` for up to ``steps`` steps; returns the loss per step.

    The learning rate rises linearly over ``warmup`` steps, then stays at ``lr``. ``stop(step)``
    is called after each step (1-based) and ends training when it returns True. ``progress(step,
    steps)`` is called after each step too, for progress bars (an early stop ends below steps).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) if warmup else 1.0
    )
    model.train()
    losses = []
    for step in range(1, steps + 1):
        loss = loss_fn(model, next(batches))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress(step, steps)
        if stop is not None and stop(step):
            break
    model.eval()
    return losses
