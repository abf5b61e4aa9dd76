"""Token-level evaluation, kept per fact: the verdict's paired tests need every row's outcome.

Per row (fact), in one teacher-forced pass:

* ``exact_match``: 1 if greedy decoding reproduces the answer (and then stops), else 0. Greedy
  decoding does so exactly when the argmax at every answer position, given the true prefix, is
  the true next token, EOS included; tests/ checks this against ``generate``.
* ``token_accuracy``: the share of answer tokens (EOS excluded) whose argmax is right.
* ``logprob``: log p(answer + EOS | prompt), summed over the answer's tokens.
* ``probability``: exp of the mean per-token log-probability, TOFU's length-normalised answer
  probability, a graded score in [0, 1] for answers of any length.

Set-level figures are means over rows (token accuracy and NLL also per token, as before).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .data import IGNORE, chunks, train_batch
from .training import to_device

SCORES = ("exact_match", "token_accuracy", "probability", "logprob")
"""Per-fact scores; the first three lie in [0, 1] and can be the verdict's metric."""


@torch.no_grad()
def score_rows(model, tokenizer, rows: Sequence[dict], batch_size: int = 64) -> dict[str, list]:
    """Every per-fact score of ``rows`` (lists in row order), plus the token counts behind them."""
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list] = {
        k: [] for k in (*SCORES, "answer_tokens", "correct_tokens", "label_tokens")
    }
    for rows_chunk in chunks(rows, batch_size):
        batch = to_device(train_batch(tokenizer, rows_chunk), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        mask = labels != IGNORE
        right = (logits.argmax(-1) == labels) | ~mask
        answer = mask & (labels != tokenizer.eos_token_id)
        logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        logp_sum = (logp * mask).sum(1)
        tokens = mask.sum(1).clamp(min=1)
        hits, n_answer = (right & answer).sum(1), answer.sum(1)
        out["exact_match"] += right.all(dim=1).float().tolist()
        out["token_accuracy"] += (hits / n_answer.clamp(min=1)).tolist()
        out["logprob"] += logp_sum.tolist()
        out["probability"] += torch.exp(logp_sum / tokens).tolist()
        out["answer_tokens"] += n_answer.tolist()
        out["correct_tokens"] += hits.tolist()
        out["label_tokens"] += mask.sum(1).tolist()
    return out


def evaluate(model, tokenizer, rows: Sequence[dict], batch_size: int = 64) -> dict:
    """Set-level scores of ``rows`` and, under ``rows``, every fact's scores with its id and group.

    Set level: exact match, answer probability (means over facts), answer-token accuracy (EOS
    excluded) and mean NLL per answer token (pooled over tokens), perplexity.
    """
    if not rows:
        nan = math.nan
        return {"n": 0, **dict.fromkeys((*SCORES[:3], "nll", "perplexity"), nan), "rows": {}}
    per = score_rows(model, tokenizer, rows, batch_size)
    nll = -sum(per["logprob"]) / max(sum(per["label_tokens"]), 1)
    return {
        "n": len(rows),
        "exact_match": sum(per["exact_match"]) / len(rows),
        "token_accuracy": sum(per["correct_tokens"]) / max(sum(per["answer_tokens"]), 1),
        "probability": sum(per["probability"]) / len(rows),
        "nll": nll,
        "perplexity": math.exp(min(nll, 50.0)),
        "rows": {
            "id": [r.get("id", str(i)) for i, r in enumerate(rows)],
            "group": [r.get("group") or r.get("id", str(i)) for i, r in enumerate(rows)],
            **{k: per[k] for k in SCORES},
        },
    }


def exact_match(model, tokenizer, rows: Sequence[dict], batch_size: int = 64) -> float:
    """Share of rows whose greedy answer is exactly right."""
    return evaluate(model, tokenizer, rows, batch_size)["exact_match"]
