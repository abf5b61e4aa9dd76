"""Linear probes and RTN quantization: planted signal, measured chance, the analytic bound."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from unlearning_audit import probes, prompts, quantization
from unlearning_audit.evaluation import evaluate


def _rows(labels, attribute="city"):
    return [{"answer": str(y), "attribute": attribute} for y in labels]


def _planted(n, classes, d, signal, rng):
    y = rng.integers(0, classes, n)
    directions = rng.normal(size=(classes, d))
    return rng.normal(size=(n, d)) + signal * directions[y], y


def test_probe_finds_a_planted_linear_signal():
    rng = np.random.default_rng(0)
    X, y = _planted(400, 6, 32, signal=2.0, rng=rng)
    result = probes.probe_layer(X[:300], _rows(y[:300]), X[300:], _rows(y[300:]))
    assert result["probe_forget"] > 0.9
    assert result["probe_retain_cv"] > 0.9
    assert result["probe_chance"] < 0.35


def test_probe_on_noise_stays_at_the_permutation_baseline():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 32))
    y = rng.integers(0, 6, 400)
    result = probes.probe_layer(X[:300], _rows(y[:300]), X[300:], _rows(y[300:]))
    assert abs(result["probe_forget"] - result["probe_chance"]) < 0.1
    assert result["probe_chance"] == pytest.approx(1 / 6, abs=0.08)


def test_probes_decode_each_attribute_separately():
    rng = np.random.default_rng(2)
    Xa, ya = _planted(200, 4, 16, 3.0, rng)
    Xb = rng.normal(size=(200, 16))  # attribute b carries no signal
    yb = rng.integers(0, 4, 200)
    X = np.vstack([Xa, Xb])
    rows = _rows(ya, "a") + _rows(yb, "b")
    train = np.r_[0:150, 200:350]
    test = np.r_[150:200, 350:400]
    result = probes.probe_layer(
        X[train], [rows[i] for i in train], X[test], [rows[i] for i in test]
    )
    assert 0.5 < result["probe_forget"] < 0.8  # about (1 + 1/4) / 2


def test_probe_input_checks():
    with pytest.raises(ValueError, match="NaN or inf"):
        probes.transfer_accuracy(np.full((4, 2), np.nan), [0, 1, 0, 1], np.zeros((2, 2)), [0, 1])
    with pytest.raises(ValueError, match="one row per label"):
        probes.cv_accuracy(np.zeros((4, 2)), [0, 1])


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_rtn_error_within_the_analytic_bound(bits):
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(bits)) * 0.05
    w[3] = 0.0  # an all-zero row stays zero
    q = quantization.quantize_rtn(w, bits)
    step = w.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
    assert ((w - q).abs() <= step / 2 + 1e-7).all()
    assert torch.equal(q[3], torch.zeros(96))
    levels = [len(torch.unique(row)) for row in q]
    assert max(levels) <= 2**bits - 1


def test_rtn_error_shrinks_with_bits_and_rejects_bad_input():
    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    errors = [(w - quantization.quantize_rtn(w, b)).abs().mean().item() for b in (3, 4, 8)]
    assert errors[0] > errors[1] > errors[2]
    with pytest.raises(ValueError, match="2-D"):
        quantization.quantize_rtn(torch.zeros(3), 8)
    with pytest.raises(ValueError, match="bits"):
        quantization.quantize_rtn(w, 1)


def test_8bit_quantization_keeps_the_original_models_accuracy(tiny_model):
    model, tok, facts, forget = tiny_model
    model = copy.deepcopy(model)
    rows = [{"question": f.question, "answer": f.answer} for f in facts if f.group not in forget]
    fmt = prompts.renderer(tok)
    before = evaluate(model, fmt, rows)["exact_match"]
    assert quantization.quantize_model(model, 8) == 7 * len(model.model.layers)  # qkvo, mlp
    at_8 = evaluate(model, fmt, rows)
    assert abs(at_8["exact_match"] - before) <= 0.05  # the stated tolerance at 8 bits
    quantization.quantize_model(model, 2)
    at_2 = evaluate(model, fmt, rows)  # 2 bits does cost: more errors, a clearly worse fit
    assert at_2["exact_match"] < at_8["exact_match"] and at_2["nll"] > 1.5 * at_8["nll"]


def test_chance_is_measured_within_each_attribute():
    """The question names its attribute, so chance is the within-attribute prior (1/4 here),
    not the prior over every attribute's values together (1/8)."""
    rng = np.random.default_rng(3)
    n = 600
    attribute = np.repeat(["a", "b"], n // 2)
    y = rng.integers(0, 4, n)
    X = rng.normal(size=(n, 8))
    X[:, 0] = np.where(attribute == "a", 3.0, -3.0)  # the attribute is readable, the value not
    rows = [{"answer": f"{g}{v}", "attribute": g} for g, v in zip(attribute, y, strict=True)]
    train, test = np.arange(n) % 4 != 0, np.arange(n) % 4 == 0
    result = probes.probe_layer(
        X[train],
        [r for r, t in zip(rows, train, strict=True) if t],
        X[test],
        [r for r, t in zip(rows, test, strict=True) if t],
    )
    assert result["probe_chance"] == pytest.approx(0.25, abs=0.08)
    assert abs(result["probe_forget"] - result["probe_chance"]) < 0.1


def test_answers_never_seen_in_training_are_refused_with_the_reason():
    X = np.random.default_rng(4).normal(size=(20, 4))
    retain = [{"answer": str(i % 3)} for i in range(10)]
    forget = [{"answer": str(100 + i)} for i in range(10)]  # e.g. unique sums
    problem = probes.label_problem(probes.probe_labels(retain), probes.probe_labels(forget))
    assert "can only name a class it was trained on" in problem
    with pytest.raises(ValueError, match="can only name a class it was trained on"):
        probes.probe_layer(X[:10], retain, X[10:], forget)


def test_probe_labels_are_the_answers_content_not_its_first_token():
    rows = [
        {"question": "In which city was Ada Lovelace born?", "answer": "In London"},
        {"question": "What is the capital of France?", "answer": "The capital of France is Paris."},
        {"question": "Which city?", "answer": "Paris", "attribute": "birthplace"},
        {"question": "Is the sky blue?", "answer": "The sky is blue."},  # nothing new: unlabelled
    ]
    assert probes.probe_labels(rows) == ["london", "paris", "birthplace=Paris", None]


def test_a_first_token_the_question_gives_away_is_not_decoded():
    """Answers start with the question's first word ("In which year ...?" "In 1815."), and the
    activations know only the question: first-token labels would decode perfectly; the
    answers' content stays at measured chance."""
    rng = np.random.default_rng(5)
    n = 400
    starts = rng.choice(["In", "On"], n)
    years = rng.choice(["1815", "1848", "1871", "1914"], n)
    rows = [
        {"question": f"{w} which year did event {i} happen?", "answer": f"{w} {y}."}
        for i, (w, y) in enumerate(zip(starts, years, strict=True))
    ]
    X = rng.normal(size=(n, 8))
    X[:, 0] += np.where(starts == "In", 3.0, -3.0)  # the question's first word, nothing more
    assert probes.probe_labels(rows[:3]) == list(years[:3])
    first = [r["answer"].split()[0] for r in rows]  # what labels were: read off the question
    assert probes.transfer_accuracy(X[:300], first[:300], X[300:], first[300:]) > 0.95
    result = probes.probe_layer(X[:300], rows[:300], X[300:], rows[300:])
    assert (
        result["probe_forget"] < 0.4 and abs(result["probe_forget"] - result["probe_chance"]) < 0.1
    )


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        (["The sky"] * 6, "1 label classes, 1 of them with 2 rows"),  # one class
        (["Rome", "Oslo", "Lima", "Kyiv"], "4 label classes, 0 of them with 2 rows"),  # singletons
        (["Red", "Red", "Blue", "Green"], "3 label classes, 1 of them with 2 rows"),
    ],
)
def test_labels_without_two_trainable_classes_are_refused_with_the_reason(answers, reason):
    retain = [{"question": "What is it?", "answer": a} for a in answers]
    forget = [{"question": "What is it?", "answer": answers[0]}]
    assert reason in probes.label_problem(probes.probe_labels(retain), probes.probe_labels(forget))
    X = np.random.default_rng(6).normal(size=(len(retain) + 1, 4))
    with pytest.raises(ValueError, match="a probe needs 2 such classes"):
        probes.probe_layer(X[:-1], retain, X[-1:], forget)
