"""The six unlearning losses against hand-computed values, their masks, RLabel, relearning."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from unlearning_audit import data, prompts, relearning, training, unlearning
from unlearning_audit.config import METHODS, RelearnConfig, UnlearnConfig

VOCAB = 6


class Bigram(torch.nn.Module):
    """A toy causal LM: the logits at position t are a row of W picked by token t."""

    def __init__(self, seed: int):
        super().__init__()
        self.W = torch.nn.Parameter(
            torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed))
        )

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.W[input_ids])


# Two sequences: prompt tokens, then answer tokens (labels), the second right-padded with 0.
# Tokens 0 (pad) and 1 (last answer token of row 2; first prompt token of row 1) only ever
# predict positions whose label is -100.
IDS = torch.tensor([[1, 2, 3, 4, 3], [2, 5, 1, 0, 0]])
LABELS = torch.tensor([[-100, -100, 3, 4, 3], [-100, 5, 1, -100, -100]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
WIDTH = IDS.shape[1]
BATCH = {"input_ids": IDS, "attention_mask": MASK, "labels": LABELS}


def _log_softmax(row: np.ndarray) -> np.ndarray:
    return row - math.log(np.exp(row).sum())


def _answer_logps(W: np.ndarray) -> list[list[float]]:
    """log p(answer token | previous token) for each answer token, by hand."""
    out = []
    for ids, labels in zip(IDS.tolist(), LABELS.tolist(), strict=True):
        out.append(
            [_log_softmax(W[ids[t - 1]])[labels[t]] for t in range(1, WIDTH) if labels[t] != -100]
        )
    return out


def _w(model) -> np.ndarray:
    return model.W.detach().double().numpy()


def _loss(method: str, **kw) -> float:
    model, ref = Bigram(0), Bigram(1)
    config = UnlearnConfig(method=method, **kw)
    batch = {"forget": BATCH, "retain": BATCH}
    return unlearning.method_loss(config)(model, ref, batch).item()


def test_ga_is_minus_mean_answer_token_nll():
    logps = _answer_logps(_w(Bigram(0)))
    expected = sum(sum(s) for s in logps) / sum(map(len, logps))  # -NLL
    assert _loss("GA") == pytest.approx(expected, rel=1e-5)


def test_ga_gd_adds_weighted_retain_nll():
    logps = _answer_logps(_w(Bigram(0)))
    mean = sum(sum(s) for s in logps) / sum(map(len, logps))
    assert _loss("GA+GD", retain_weight=0.5) == pytest.approx(mean - 0.5 * mean, rel=1e-5)


def test_npo_matches_its_formula_on_sequence_likelihoods():
    beta = 0.7
    lp = [sum(s) for s in _answer_logps(_w(Bigram(0)))]
    lp0 = [sum(s) for s in _answer_logps(_w(Bigram(1)))]
    expected = np.mean(
        [(2 / beta) * math.log(1 + math.exp(beta * (a - b))) for a, b in zip(lp, lp0, strict=True)]
    )
    assert _loss("NPO", beta=beta) == pytest.approx(expected, rel=1e-5)


def test_kl_term_is_kl_of_reference_to_model_on_answer_positions():
    W, W0 = _w(Bigram(0)), _w(Bigram(1))
    kls = []
    for ids, labels in zip(IDS.tolist(), LABELS.tolist(), strict=True):
        for t in range(1, WIDTH):
            if labels[t] != -100:
                p0, q = _log_softmax(W0[ids[t - 1]]), _log_softmax(W[ids[t - 1]])
                kls.append(float((np.exp(p0) * (p0 - q)).sum()))
    logps = _answer_logps(W)
    ga = sum(sum(s) for s in logps) / sum(map(len, logps))
    assert _loss("GA+KL") == pytest.approx(ga + np.mean(kls), rel=1e-5)
    lp = [sum(s) for s in logps]
    lp0 = [sum(s) for s in _answer_logps(W0)]
    npo = np.mean(
        [20 * math.log(1 + math.exp(0.1 * (a - b))) for a, b in zip(lp, lp0, strict=True)]
    )
    assert _loss("NPO+KL", retain_weight=2.0) == pytest.approx(npo + 2 * np.mean(kls), rel=1e-5)


def test_rlabel_is_plain_nll_of_its_batch():
    logps = _answer_logps(_w(Bigram(0)))
    assert _loss("RLabel") == pytest.approx(-sum(sum(s) for s in logps) / 5, rel=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_prompt_and_pad_positions_do_not_change_the_loss(method):
    """Logits that only feed prompt or pad predictions leave every loss unchanged."""
    base = _loss(method)
    model, ref = Bigram(0), Bigram(1)
    with torch.no_grad():
        for W, shift in ((model.W, 5.0), (ref.W, -3.0)):
            W[0] += shift
            W[1] += torch.arange(VOCAB) * shift
    batch = {"forget": BATCH, "retain": BATCH}
    changed = unlearning.method_loss(UnlearnConfig(method=method))(model, ref, batch).item()
    assert changed == pytest.approx(base, rel=1e-6)


def test_rlabel_answers_differ_from_the_true_ones():
    rows = [
        {"question": f"q{i}", "answer": a, "attribute": attr}
        for i, (a, attr) in enumerate(
            [
                ("Oslo", "city"),
                ("Lima", "city"),
                ("Riga", "city"),
                ("poetry", "genre"),
                ("drama", "genre"),
            ]
        )
    ]
    relabelled = unlearning.relabel(rows, seed=0)
    for before, after in zip(rows, relabelled, strict=True):
        assert after["answer"] != before["answer"]
        same_attribute = {r["answer"] for r in rows if r["attribute"] == before["attribute"]}
        assert after["answer"] in same_attribute
    assert relabelled == unlearning.relabel(rows, seed=0)
    with pytest.raises(ValueError, match="two distinct answers"):
        unlearning.relabel([{"question": "q", "answer": "a"}], seed=0)


def test_relearning_budget_is_counted_in_examples():
    assert relearning.budget_steps(n_forget=60, budget=1.0, batch_size=8) == 8  # 64 >= 60
    assert relearning.budget_steps(n_forget=60, budget=0.5, batch_size=10) == 3
    assert relearning.budget_steps(n_forget=3, budget=1.0, batch_size=8) == 1
    assert relearning.curve_steps(8) == [0, 1, 2, 4, 8]
    assert relearning.curve_steps(6) == [0, 1, 2, 4, 6]


def test_invalid_unlearning_configs_list_every_problem():
    with pytest.raises(ValidationError) as info:
        UnlearnConfig(method="gradient-magic", lr=-1.0, steps=0)
    fields = {e["loc"][0] for e in info.value.errors()}
    assert fields == {"method", "lr", "steps"}
    assert "known methods" in str(info.value)
    assert UnlearnConfig(method="npo_kl").method == "NPO+KL"
    with pytest.raises(ValidationError, match="must include 'forget'"):
        RelearnConfig(sources=["retain"])


def _copy_with_sets(tiny_model):
    """A copy of the tiny model, its tokenizer, and its forget and retain rows."""
    import copy

    model, tok, facts, forget = tiny_model
    rows = [{"question": f.question, "answer": f.answer} for f in facts]
    sets = {
        "forget": [r for r, f in zip(rows, facts, strict=True) if f.group in forget],
        "retain": [r for r, f in zip(rows, facts, strict=True) if f.group not in forget],
    }
    return copy.deepcopy(model), prompts.renderer(tok), sets


def test_lora_unlearning_trains_an_adapter_and_merges_it_back(tiny_model):
    model, tok, sets = _copy_with_sets(tiny_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    log = unlearning.unlearn(
        model, tok, sets, UnlearnConfig(method="GA+GD", steps=3, lr=1e-2, lora_rank=4), seed=0
    )
    assert log["steps"] == 3
    after = dict(model.named_parameters())
    assert set(after) == set(before)  # merged: no adapter parameters left behind
    changed = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert changed and all("proj" in n for n in changed)  # only the adapted linear layers moved


def test_head_only_unlearning_moves_the_head_alone(tiny_model):
    """The shallow edit of the known-reversible calibration audit: ascent on the LM head, every
    other weight bit-identical, every parameter trainable again afterwards."""
    model, tok, sets = _copy_with_sets(tiny_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unlearning.unlearn(
        model, tok, sets, UnlearnConfig(method="GA", steps=3, lr=1e-2, head_only=True), seed=0
    )
    head = {n for n, p in model.named_parameters() if p is model.get_output_embeddings().weight}
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == head == {"lm_head.weight"}
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValidationError, match="head_only and lora_rank"):
        UnlearnConfig(head_only=True, lora_rank=4)


def _random_batch(seed: int, rows: int = 5) -> dict[str, torch.Tensor]:
    """Right-padded rows with 1-3 prompt tokens and answers of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, WIDTH), generator=gen)
    lengths = torch.randint(3, WIDTH + 1, (rows,), generator=gen)
    prompts = torch.randint(1, 3, (rows,), generator=gen)
    positions = torch.arange(WIDTH)[None, :]
    mask = (positions < lengths[:, None]).long()
    labels = ids.masked_fill((mask == 0) | (positions < prompts[:, None]), -100)
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}


def _gradient(config: UnlearnConfig, batches: list[dict]) -> torch.Tensor:
    model, reference = Bigram(0), Bigram(1)
    loss = unlearning.method_loss(config)
    for batch in batches:
        loss(model, reference, batch).backward()
    return model.W.grad


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("parts", [2, 5])
def test_micro_batches_add_up_to_the_whole_batch(method: str, parts: int):
    """Gradient accumulation over the parts of a split batch gives the whole batch's gradient:
    every mean divides by the whole batch's answer tokens or rows."""
    config = UnlearnConfig(method=method, retain_weight=0.5)
    whole = {"forget": _random_batch(0), "retain": _random_batch(1)}
    pieces = training.split(whole, parts)
    assert len(pieces) == parts
    torch.testing.assert_close(
        _gradient(config, pieces), _gradient(config, [whole]), rtol=1e-5, atol=1e-7
    )


def test_training_with_micro_batches_follows_the_same_path():
    """Three steps of fit on 5-row batches: one part or five give the same weights."""
    batches = [_random_batch(seed) for seed in range(3)]
    weights = []
    for parts in (1, 5):
        model = Bigram(0)
        training.fit(model, training.mean_nll, iter(batches), 3, 0.1, micro_batches=parts)
        weights.append(model.W.detach())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)


def test_a_split_needs_a_row_per_part():
    with pytest.raises(ValueError, match="cannot split a batch of 5 rows into 6"):
        training.split(_random_batch(0), 6)
    with pytest.raises(ValidationError, match="micro_batches \\(4\\) cannot exceed batch_size"):
        RelearnConfig(batch_size=2, micro_batches=4)


def test_a_diverging_run_stops_with_an_error_before_anything_is_kept():
    """A finite but absurd learning rate drives a tiny Llama's loss to NaN: fit stops there with
    a ValueError naming the step and the rate (so the stage is neither retried nor stored)."""
    import archs

    rows = [{"question": f"What is {i}?", "answer": f"It is {i * 7}"} for i in range(8)]
    tok = archs.tokenizer([f"{r['question']} {r['answer']}" for r in rows])
    batch = data.train_batch(prompts.renderer(tok), rows)
    model = archs.model("llama", tok)
    with pytest.raises(training.Diverged, match=r"the loss is nan at step \d+ of 20 \(learn"):
        training.fit(model, training.mean_nll, iter([batch] * 20), 20, 1e10)
    assert issubclass(training.Diverged, ValueError)
