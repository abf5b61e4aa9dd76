"""Token-level evaluation: exact match of greedy answers, answer-token accuracy, NLL.

Exact match is computed in one teacher-forced pass: greedy decoding reproduces the answer (and
then stops) exactly when the argmax at every answer position, given the true prefix, is the true
next token, EOS included. tests/ checks this against ``generate``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .data import IGNORE, chunks, train_batch
from .training import to_device


@torch.no_grad()
def evaluate(model, tokenizer, rows: Sequence[dict], batch_size: int = 64) -> dict:
    """Exact match, answer-token accuracy (EOS excluded), mean NLL and perplexity on ``rows``.

    Also returns ``correct``, the exact-match outcome per row, in order.
    """
    if not rows:
        return {
            "n": 0,
            "exact_match": math.nan,
            "token_accuracy": math.nan,
            "nll": math.nan,
            "perplexity": math.nan,
            "correct": [],
        }
    model.eval()
    device = next(model.parameters()).device
    correct: list[bool] = []
    hits = answer_tokens = label_tokens = 0
    nll_sum = 0.0
    for rows_chunk in chunks(rows, batch_size):
        batch = to_device(train_batch(tokenizer, rows_chunk), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        mask = labels != IGNORE
        right = (logits.argmax(-1) == labels) | ~mask
        correct += right.all(dim=1).tolist()
        answer = mask & (labels != tokenizer.eos_token_id)
        hits += (right & answer).sum().item()
        answer_tokens += answer.sum().item()
        logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        nll_sum -= (logp * mask).sum().item()
        label_tokens += mask.sum().item()
    nll = nll_sum / max(label_tokens, 1)
    return {
        "n": len(rows),
        "exact_match": sum(correct) / len(correct),
        "token_accuracy": hits / max(answer_tokens, 1),
        "nll": nll,
        "perplexity": math.exp(min(nll, 50.0)),
        "correct": correct,
    }


def exact_match(model, tokenizer, rows: Sequence[dict], batch_size: int = 64) -> float:
    """Share of rows whose greedy answer is exactly right."""
    return evaluate(model, tokenizer, rows, batch_size)["exact_match"]
