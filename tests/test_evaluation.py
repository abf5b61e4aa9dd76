"""Exact match by one teacher-forced pass equals exact match of real greedy generation."""

from __future__ import annotations

import torch

from unlearning_audit import corpus, data, embedded, runtime
from unlearning_audit.evaluation import evaluate


def _greedy_exact_match(model, tok, rows) -> list[bool]:
    out = []
    for row in rows:
        batch = data.prompt_batch(tok, [row], left=True)
        answer = tok(f" {row['answer']}", add_special_tokens=False)["input_ids"]
        generated = model.generate(
            **batch,
            max_new_tokens=len(answer) + 1,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )[0, batch["input_ids"].shape[1] :].tolist()
        out.append(generated == [*answer, tok.eos_token_id])
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
    scores = evaluate(model, tok, rows, batch_size=7)
    greedy = _greedy_exact_match(model, tok, rows)
    assert scores["correct"] == greedy
    assert 0 < sum(greedy) < len(rows)  # both outcomes occur, so the comparison means something
    assert scores["exact_match"] == sum(greedy) / len(rows)
    with torch.no_grad():
        assert scores["nll"] > 0 and scores["perplexity"] > 1
