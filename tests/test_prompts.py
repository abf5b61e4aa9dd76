"""Prompt formats: the answer's tokens are the model's own, in every format and tokenizer style;
chat templates end the answer with their end-of-turn token; ROUGE-L and the default metric."""

from __future__ import annotations

import itertools
import random

import archs
import pytest

from unlearning_audit import data, evaluation, prompts, runtime

ROWS = [
    {"question": "Where was Ada Quill born?", "answer": "Bergen"},
    {"question": "What did Ada Quill write?", "answer": "The Salt Ledger, a novel of the sea"},
    {"question": "Which prize did she win?", "answer": "Booker Prize"},
]


def _texts(template: str = prompts.QA_TEMPLATE) -> list[str]:
    return [
        template.replace("{question}", r["question"]).replace("{answer}", r["answer"]) for r in ROWS
    ]


@pytest.mark.parametrize("style", ["bytes", "marker"])
@pytest.mark.parametrize(
    "template", [prompts.QA_TEMPLATE, "Question: {question}\nAnswer: {answer}"]
)
def test_answer_tokens_are_the_models_own_tokens_of_the_whole_text(style, template):
    """Split at the answer's offset, prompt + answer is the whole text's own tokenization; with a
    space-marker tokenizer the answer tokenized apart starts with a token the model never sees
    after that prompt, which is the failure this rendering avoids."""
    tok = archs.tokenizer(_texts(template) * 3, style=style)
    fmt = prompts.renderer(tok, template)
    for row, encoded, text in zip(ROWS, fmt.encode(ROWS), _texts(template), strict=True):
        whole = tok(text, add_special_tokens=False)["input_ids"]
        assert encoded.prompt == [tok.bos_token_id, *whole[: len(encoded.prompt) - 1]]
        assert encoded.prompt[1:] + encoded.answer == whole
        assert tok.decode(encoded.answer).strip() == row["answer"]
        assert encoded.end == [tok.eos_token_id]
    if style == "marker":
        apart = tok(" " + ROWS[0]["answer"], add_special_tokens=False)["input_ids"]
        assert apart != fmt.encode(ROWS[:1])[0].answer


def test_a_token_across_the_answers_start_belongs_to_the_answer():
    """Where the tokenizer merges the prompt's last characters with the answer's first (no
    space between them), the shared token starts the answer: no token is split."""
    template = "Question: {question}\nAnswer:{answer}"
    tok = archs.tokenizer(_texts(template) * 3, style="marker")
    fmt = prompts.renderer(tok, template)
    for row, encoded, text in zip(ROWS, fmt.encode(ROWS), _texts(template), strict=True):
        assert (
            encoded.prompt[1:] + encoded.answer == tok(text, add_special_tokens=False)["input_ids"]
        )
        assert tok.decode(encoded.answer).endswith(row["answer"])


def test_chat_template_renders_turns_and_ends_the_answer_with_end_of_turn():
    tok = archs.tokenizer(_texts() * 3, chat=True)
    fmt = prompts.renderer(tok)  # auto: the tokenizer's chat template
    assert fmt.name == prompts.CHAT
    end_of_turn = tok.convert_tokens_to_ids("<|end|>")
    for row, encoded in zip(ROWS, fmt.encode(ROWS), strict=True):
        generation_prompt = tok.apply_chat_template(
            [{"role": "user", "content": row["question"]}], add_generation_prompt=True
        )
        generation_prompt = generation_prompt.get("input_ids", generation_prompt)
        assert encoded.prompt == list(generation_prompt)
        assert tok.decode(encoded.answer) == row["answer"]
        assert encoded.end == [end_of_turn]
    assert fmt.stop_ids(fmt.encode(ROWS)) == sorted({end_of_turn, tok.eos_token_id})


def test_raw_format_joins_question_and_answer_with_the_separator():
    tok = archs.tokenizer(_texts("{question} => {answer}") * 3)
    fmt = prompts.renderer(tok, "raw", separator=" => ")
    (encoded,) = fmt.encode(ROWS[:1])
    assert tok.decode(encoded.prompt[1:]) + tok.decode(encoded.answer) == (
        f"{ROWS[0]['question']} => {ROWS[0]['answer']}"
    )


def test_bad_formats_are_refused_with_the_reason():
    tok = archs.tokenizer(_texts())
    with pytest.raises(ValueError, match="no chat template"):
        prompts.renderer(tok, "chat")
    for bad in ("{answer} {question}", "Q: {question}", "{question}{answer}{answer}"):
        with pytest.raises(ValueError, match="question"):
            prompts.check_format(bad)


def _lcs_brute_force(a: list[str], b: list[str]) -> int:
    """The longest common subsequence by trying every subsequence of the shorter list."""
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    for k in range(len(short), 0, -1):
        for picked in itertools.combinations(short, k):
            it = iter(long)
            if all(word in it for word in picked):
                return k
    return 0


def test_rouge_l_recall_against_hand_worked_cases_and_brute_force():
    assert evaluation.rouge_l_recall("The cat sat on the mat.", "the cat on a mat") == 0.8
    assert evaluation.rouge_l_recall("Bergen", "Bergen") == 1.0
    assert evaluation.rouge_l_recall("", "Bergen") == 0.0
    assert evaluation.rouge_l_recall("BERGEN, Norway!", "bergen") == 1.0
    rng = random.Random(0)
    for _ in range(200):
        pred = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
        ref = [rng.choice("abcd") for _ in range(rng.randint(1, 7))]
        expected = _lcs_brute_force(pred, ref) / len(ref)
        assert evaluation.rouge_l_recall(" ".join(pred), " ".join(ref)) == pytest.approx(expected)


def test_default_metric_follows_answer_length():
    short = [{"answer": "Bergen"}, {"answer": "Booker Prize"}]
    long = [{"answer": "She was born in Bergen to a family of sailors and teachers"}] * 2
    assert evaluation.default_metric(short) == "exact_match"
    assert evaluation.default_metric(long) == "token_accuracy"
    assert evaluation.resolve_metric("probability", long) == "probability"


@pytest.mark.parametrize("chat", [False, True])
def test_generated_answers_score_rouge_one_where_exact_match_holds(chat):
    """ROUGE-L from real greedy generations agrees with teacher-forced exact match: a fact the
    model reproduces exactly is generated whole, in either format."""
    rows = [
        {"question": f"Which colour is the flag of town {i}?", "answer": f"{c} and gold"}
        for i, c in enumerate(["red", "blue", "green", "amber", "violet", "silver"])
    ]
    tok = archs.tokenizer([f"{r['question']} {r['answer']}" for r in rows] * 3, chat=chat)
    fmt = prompts.renderer(tok)
    runtime.setup(0, "cpu")
    net = archs.model("llama", tok)
    archs.finetune(net, fmt, rows[:4], 150)
    scores = evaluation.evaluate(net, fmt, rows, batch_size=4, generate=16)["rows"]
    assert sum(scores["exact_match"]) >= 3  # it learned the facts it was taught
    for em, rouge in zip(scores["exact_match"], scores["rouge_l"], strict=True):
        assert rouge == 1.0 or em == 0.0
    answers = evaluation.generate_answers(net, fmt, rows[:4], max_new_tokens=16)
    assert sum(a == r["answer"] for a, r in zip(answers, rows[:4], strict=True)) >= 3


def test_chat_trained_model_knows_its_facts_only_in_its_own_format():
    rows = [
        {"question": f"Which colour is the flag of town {i}?", "answer": c}
        for i, c in enumerate(["red", "blue", "green", "amber", "violet", "silver"])
    ]
    tok = archs.tokenizer([f"{r['question']} {r['answer']}" for r in rows] * 3, chat=True)
    runtime.setup(0, "cpu")
    net = archs.model("llama", tok)
    chat = prompts.renderer(tok)
    archs.finetune(net, chat, rows, 150)
    qa = prompts.renderer(tok, prompts.QA_TEMPLATE)
    assert evaluation.exact_match(net, chat, rows) >= 0.8
    assert evaluation.exact_match(net, qa, rows) <= 0.2
    batch = data.train_batch(chat, rows)
    assert (batch["labels"][batch["answer"]] >= 0).all()  # answer positions carry labels
