"""Token-level evaluation, kept per fact: the verdict's paired tests need every row's outcome.

Per row (fact), in one teacher-forced pass:

* ``exact_match``: 1 if greedy decoding reproduces the answer (and then stops), else 0. Greedy
  decoding does so exactly when the argmax at every answer position, given the true prefix, is
  the true next token, the answer's end included; tests/ checks this against ``generate``.
* ``token_accuracy``: the share of answer tokens (its end excluded) whose argmax is right.
* ``logprob``: log p(answer + end | prompt), summed over those tokens.
* ``probability``: exp of the mean per-token log-probability, TOFU's length-normalised answer
  probability, a graded score in [0, 1] for answers of any length.
* ``rouge_l`` (where asked for): ROUGE-L recall of the model's greedy generation, real
  ``generate`` calls, batched, with a cap on new tokens.

The answer and its end (EOS, or a chat template's end of turn) are the format's (prompts.py).

Set-level figures are means over rows (token accuracy and NLL also per token, as before).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence

import torch

from .data import IGNORE, chunks, pad_prompts, train_batch
from .prompts import Renderer
from .training import to_device

SCORES = ("exact_match", "token_accuracy", "probability", "logprob")
"""Per-fact scores of one teacher-forced pass; the first three lie in [0, 1]."""
GENERATED = "rouge_l"
"""The per-fact score read from greedy generations, in [0, 1]."""
SHORT_ANSWER_WORDS = 4


def default_metric(rows: Sequence[dict]) -> str:
    """The verdict's metric for a forget set: exact match where answers are short (median at
    most SHORT_ANSWER_WORDS words), else answer-token accuracy, which credits a long answer's
    every right token where exact match is 0 for any slip."""
    words = statistics.median(len(r["answer"].split()) for r in rows) if rows else 0
    return "exact_match" if words <= SHORT_ANSWER_WORDS else "token_accuracy"


def resolve_metric(metric: str, rows: Sequence[dict]) -> str:
    """``metric``, or for ``auto`` the default of these forget rows."""
    return default_metric(rows) if metric == "auto" else metric


@torch.no_grad()
def score_rows(
    model, fmt: Renderer, rows: Sequence[dict], batch_size: int = 64, generate: int = 0
) -> dict[str, list]:
    """Every per-fact score of ``rows`` (lists in row order), plus the token counts behind
    them; with ``generate`` > 0, also ROUGE-L recall of greedy generations of at most that
    many new tokens."""
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list] = {
        k: [] for k in (*SCORES, "answer_tokens", "correct_tokens", "label_tokens")
    }
    for rows_chunk in chunks(rows, batch_size):
        batch = to_device(train_batch(fmt, rows_chunk), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        mask, answer = labels != IGNORE, batch["answer"][:, 1:]
        right = (logits.argmax(-1) == labels) | ~mask
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
    if generate:
        answers = generate_answers(model, fmt, rows, batch_size, generate)
        out[GENERATED] = [
            rouge_l_recall(a, r["answer"]) for a, r in zip(answers, rows, strict=True)
        ]
    return out


@torch.no_grad()
def generate_answers(
    model, fmt: Renderer, rows: Sequence[dict], batch_size: int = 64, max_new_tokens: int = 64
) -> list[str]:
    """Greedy answers to the rows' prompts, stopped at EOS or the format's end of turn, of at
    most ``max_new_tokens`` tokens (and at most the batch's longest answer plus 8: a longer
    generation cannot add to ROUGE-L recall of an answer it has not begun)."""
    model.eval()
    device = next(model.parameters()).device
    texts = []
    for rows_chunk in chunks(rows, batch_size):
        encoded = fmt.encode(rows_chunk)
        batch = to_device(pad_prompts(encoded, fmt.pad_id, left=True), device)
        cap = min(max_new_tokens, max(len(e.answer) for e in encoded) + 8)
        ids = model.generate(
            **batch,
            max_new_tokens=cap,
            do_sample=False,
            eos_token_id=fmt.stop_ids(encoded),
            pad_token_id=fmt.pad_id,
        )
        new = ids[:, batch["input_ids"].shape[1] :].tolist()
        texts += fmt.tokenizer.batch_decode(new, skip_special_tokens=True)
    return [t.strip() for t in texts]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall: the longest common subsequence of words over the reference's words
    (lower-cased; punctuation ignored), TOFU's score of generated answers."""
    pred, ref = _words(prediction), _words(reference)
    if not ref:
        return 0.0
    previous = [0] * (len(pred) + 1)  # LCS lengths of the reference so far with pred[:j]
    for word in ref:
        current = [0]
        for j, p in enumerate(pred, 1):
            current.append(previous[j - 1] + 1 if word == p else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1] / len(ref)


def evaluate(
    model, fmt: Renderer, rows: Sequence[dict], batch_size: int = 64, generate: int = 0
) -> dict:
    """Set-level scores of ``rows`` and, under ``rows``, every fact's scores with its id and group.

    Set level: exact match, answer probability (means over facts), answer-token accuracy (the
    answer's end excluded) and mean NLL per label token (pooled over tokens), perplexity, and
    with ``generate`` (the cap on new tokens) ROUGE-L recall of greedy generations.
    """
    names = (*SCORES, GENERATED) if generate else SCORES
    if not rows:
        nan = math.nan
        means = dict.fromkeys((*SCORES[:3], "nll", "perplexity"), nan)
        return {"n": 0, **means, **({GENERATED: nan} if generate else {}), "rows": {}}
    per = score_rows(model, fmt, rows, batch_size, generate)
    nll = -sum(per["logprob"]) / max(sum(per["label_tokens"]), 1)
    return {
        "n": len(rows),
        "exact_match": sum(per["exact_match"]) / len(rows),
        "token_accuracy": sum(per["correct_tokens"]) / max(sum(per["answer_tokens"]), 1),
        "probability": sum(per["probability"]) / len(rows),
        **({GENERATED: sum(per[GENERATED]) / len(rows)} if generate else {}),
        "nll": nll,
        "perplexity": math.exp(min(nll, 50.0)),
        "rows": {
            "id": [r.get("id", str(i)) for i, r in enumerate(rows)],
            "group": [r.get("group") or r.get("id", str(i)) for i, r in enumerate(rows)],
            **{k: per[k] for k in names},
        },
    }


def exact_match(model, fmt: Renderer, rows: Sequence[dict], batch_size: int = 64) -> float:
    """Share of rows whose greedy answer is exactly right."""
    return evaluate(model, fmt, rows, batch_size)["exact_match"]
