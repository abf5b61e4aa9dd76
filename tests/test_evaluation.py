"""Exact match by one teacher-forced pass equals exact match of real greedy generation."""

from __future__ import annotations

import math

import pytest
import torch

from unlearning_audit import corpus, data, embedded, prompts, runtime
from unlearning_audit.evaluation import evaluate


def _greedy_exact_match(model, fmt, rows) -> list[bool]:
    tok, out = fmt.tokenizer, []
    for row in rows:
        batch = data.prompt_batch(fmt, [row], left=True)
        (encoded,) = fmt.encode([row])
        generated = model.generate(
            **batch,
            max_new_tokens=len(encoded.answer) + 1,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )[0, batch["input_ids"].shape[1] :].tolist()
        out.append(generated == [*encoded.answer, tok.eos_token_id])
    return out


def test_teacher_forced_exact_match_equals_greedy_generation(tiny):
    runtime.setup(0, "cpu")
    facts = corpus.generate(0, {"text": 8, "math": 4})
    rows = [{"question": f.question, "answer": f.answer} for f in facts]
    tok = embedded.train_tokenizer(facts, 400)
    model = embedded.build_model(tok, tiny)
    config = tiny.model_copy(
        update={
            "max_steps": 120,
            "eval_every": 40,
            "target_exact_match": 0.0,
            "target_token_accuracy": 0.0,
        }
    )
    embedded.pretrain(model, tok, rows[::2], rows[::2], config)  # half learned, half not
    fmt = prompts.renderer(tok)
    scores = evaluate(model, fmt, rows, batch_size=7)
    greedy = _greedy_exact_match(model, fmt, rows)
    assert scores["rows"]["exact_match"] == [float(g) for g in greedy]
    assert 0 < sum(greedy) < len(rows)  # both outcomes occur, so the comparison means something
    assert scores["exact_match"] == sum(greedy) / len(rows)
    with torch.no_grad():
        assert scores["nll"] > 0 and scores["perplexity"] > 1


def _alone(model, fmt, row) -> tuple[float, float]:
    """log p(answer + EOS | prompt) and token accuracy of one row, scored by itself (no pads)."""
    tok = fmt.tokenizer
    batch = data.train_batch(fmt, [row])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
    labels = batch["labels"][0, 1:]
    positions = (labels != -100).nonzero()[:, 0].tolist()
    logprob = sum(torch.log_softmax(logits[t], -1)[labels[t]].item() for t in positions)
    answer = [t for t in positions if labels[t] != tok.eos_token_id]
    hits = sum(int(logits[t].argmax() == labels[t]) for t in answer)
    return logprob, hits / len(answer)


def test_per_fact_scores_match_each_row_scored_alone(tiny):
    """Per-fact log-probability, answer probability and token accuracy from a padded batch equal
    the same row scored alone, and the set-level means are the means of the facts."""
    runtime.setup(0, "cpu")
    facts = corpus.generate(3, {"text": 3, "code": 2})
    rows = [{"question": f.question, "answer": f.answer, "group": f.group} for f in facts]
    tok = embedded.train_tokenizer(facts, 300)
    model = embedded.build_model(tok, tiny)
    fmt = prompts.renderer(tok)
    scores = evaluate(model, fmt, rows, batch_size=4)
    per = scores["rows"]
    assert per["group"] == [r["group"] for r in rows] and len(set(per["id"])) == len(rows)
    for i, row in enumerate(rows):
        logprob, accuracy = _alone(model, fmt, row)
        tokens = len(fmt.encode([row])[0].answer) + 1
        assert per["logprob"][i] == pytest.approx(logprob, abs=1e-4)
        assert per["probability"][i] == pytest.approx(math.exp(logprob / tokens), rel=1e-4)
        assert per["token_accuracy"][i] == pytest.approx(accuracy)
    assert scores["probability"] == pytest.approx(sum(per["probability"]) / len(rows))
    assert scores["exact_match"] == pytest.approx(sum(per["exact_match"]) / len(rows))
